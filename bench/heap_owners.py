"""Splits heaptrack's peak heap (folded stacks, `heaptrack_print --flamegraph-cost-type
peak -F`) by owner, per connected client: the table of issue 14's closing note.

    python3 bench/heap_owners.py PEAK_FOLDED CLIENTS

An allocation is given to the first owner whose marks all appear among the innermost
frames of its stack (heaptrack lists inlined frames out of order, so a window rather than
the one innermost frame), in the order below; what matches none is listed by its innermost
frames."""
import collections
import sys

WINDOW = 16
# (owner, [alternatives, each a list of marks that must all appear in the window])
OWNERS = [
    ("tokio task cells (session, writer and actor tasks)", [["bind_new_task"]]),
    ("ractor actor cell and its two mailboxes",
     [["actor_properties.rs"], ["actor_cell.rs"], ["(actor.rs)", "(chan.rs)"]]),
    ("ractor message-loop future (one box per actor)", [["(actor.rs)", "pin<> (boxed.rs)"]]),
    ("registry maps (dashmap, hashbrown)", [["dashmap"], ["reserve_rehash"]]),
    ("session outbound queue and handles", [["new_session"], ["(session.rs)"]]),
    ("WebSocket read/write buffers (BytesMut)", [["bytes_mut.rs"]]),
    ("WebSocket split halves (BiLock)", [["bilock"]]),
    ("sled and the store's batches (mostly fixed)", [["sled"], ["pagetable"], ["(store.rs)"], ["(db.rs)"]]),
    ("sled's metrics histograms (fixed)", [["(histogram.rs)"]]),
    ("tokio socket registrations", [["registration"]]),
    ("driver index", [["(index.rs)"]]),
    ("hyper connection", [["(conn.rs)"], ["(http1.rs)"]]),
]


def owner(stack):
    window = ";".join(stack.split(";")[-WINDOW:])
    for name, alternatives in OWNERS:
        if any(all(m in window for m in marks) for marks in alternatives):
            return name
    return "other: " + " | ".join(f[:40] for f in stack.split(";")[-3:])


def main():
    path, clients = sys.argv[1], int(sys.argv[2])
    total, by = 0, collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        total += int(n)
        by[owner(stack)] += int(n)
    print(f"peak heap {total / 1e6:.1f} MB = {total / clients:,.0f} bytes per client ({clients} clients)")
    print(f"{'MB':>8} {'B/client':>9}  owner")
    for name, n in by.most_common(14):
        print(f"{n / 1e6:8.2f} {n / clients:9,.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
