#!/usr/bin/env python3
"""A client generated from docs/openapi.json by openapi-python-client drives a live
dispatchd: registration, a quote and a trip read all go through the generated code, with
its typed models; only the ride request itself goes over a WebSocket (it is not REST).

    python3 docs/api/client_test.py --url http://127.0.0.1:PORT --client-dir DIR

DIR holds the generated package `dispatchd_client` (`.ci/api.sh` generates it). Exit
status 0 when every step got the reply the document promises."""
import argparse
import asyncio
import json
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--client-dir", required=True)
args = parser.parse_args()
sys.path.insert(0, args.client_dir)

from websockets.asyncio.client import connect  # noqa: E402

from dispatchd_client import AuthenticatedClient, Client  # noqa: E402
from dispatchd_client.api.drivers import register_driver  # noqa: E402
from dispatchd_client.api.riders import quote, register_rider  # noqa: E402
from dispatchd_client.api.trips import get_trip  # noqa: E402
from dispatchd_client.models import (  # noqa: E402
    ErrorBody,
    LatLng,
    Product,
    QuoteRequest,
    QuoteResponse,
    RegisterDriver,
    RegisterRider,
    RiderRegistered,
    DriverRegistered,
    Trip,
    TripState,
    Vehicle,
)

PICKUP = LatLng(lat=40.7484, lng=-73.9857)
DROPOFF = LatLng(lat=40.7614, lng=-73.9776)


def expect(what, reply, status, model):
    assert reply.status_code == status, f"{what}: HTTP {reply.status_code}: {reply.content!r}"
    assert isinstance(reply.parsed, model), f"{what}: parsed as {type(reply.parsed)}"
    print(f"{what}: {int(reply.status_code)} {type(reply.parsed).__name__}")
    return reply.parsed


async def main():
    anon = Client(base_url=args.url, raise_on_unexpected_status=True)
    rider = expect(
        "register a rider",
        register_rider.sync_detailed(client=anon, body=RegisterRider(name="Ada Lovelace", phone="+1 212 555 0100")),
        201,
        RiderRegistered,
    )
    vehicle = Vehicle(make="Toyota", model="Prius", plate="T123456C", color="white", product=Product.ECONOMY, seats=4)
    driver = expect(
        "register a driver",
        register_driver.sync_detailed(client=anon, body=RegisterDriver(name="Grace Hopper", vehicle=vehicle)),
        201,
        DriverRegistered,
    )
    def ask_quote(client):
        return quote.sync_detailed(
            client=client, body=QuoteRequest(pickup=PICKUP, dropoff=DROPOFF, product=Product.ECONOMY)
        )

    as_rider = AuthenticatedClient(base_url=args.url, token=rider.token, raise_on_unexpected_status=True)
    q = expect("quote", ask_quote(as_rider), 201, QuoteResponse)
    assert q.fare_cents > 0 and q.product == Product.ECONOMY, q
    # The error body is typed too: a driver may not ask for a quote.
    as_driver = AuthenticatedClient(base_url=args.url, token=driver.token, raise_on_unexpected_status=True)
    refused = expect("a driver's quote", ask_quote(as_driver), 403, ErrorBody)
    assert refused.error.code == "forbidden", refused

    # The ride itself: a driver online near the pickup, the rider requests with the quote.
    ws = args.url.replace("http://", "ws://")
    async with connect(f"{ws}/v1/ws/driver", additional_headers={"Authorization": f"Bearer {driver.token}"}) as d, \
            connect(f"{ws}/v1/ws/rider", additional_headers={"Authorization": f"Bearer {rider.token}"}) as r:
        async def reply(sock, req):
            while True:
                m = json.loads(await asyncio.wait_for(sock.recv(), 10))
                if m.get("req") == req:
                    assert m["type"] != "error", m
                    return m
        await d.send(json.dumps({"type": "go_online", "req": 1}))
        await reply(d, 1)
        await d.send(json.dumps({"type": "location", "lat": 40.7505, "lng": -73.9934, "ts": 0, "req": 2}))
        await reply(d, 2)
        await r.send(json.dumps({"type": "request_ride", "quote_id": q.quote_id, "req": 1}))
        trip_id = (await reply(r, 1))["trip"]["trip_id"]

    trip = expect("read the trip (rider)", get_trip.sync_detailed(trip_id, client=as_rider), 200, Trip)
    assert trip.trip_id == trip_id and trip.quote.fare_cents == q.fare_cents, trip
    assert trip.state in (TripState.DISPATCHING, TripState.DRIVER_ASSIGNED), trip.state
    missing = expect("read an unknown trip", get_trip.sync_detailed("trp_" + "0" * 32, client=as_rider), 404, ErrorBody)
    assert missing.error.code == "not_found", missing
    print("generated client: every step as documented")


asyncio.run(main())
