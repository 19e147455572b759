import { describe, expect, it } from 'vitest';
import {
  statusColour, STATUS_COLOURS, cellStyle, surgeStyle, headingEnd, graticuleStep, graticuleLines,
  viewOf, parseSearch, errorText, ms, percent,
} from './logic.js';

describe('status colours', () => {
  it('tells the three statuses apart', () => {
    const c = ['available', 'offered', 'on_trip'].map(statusColour);
    expect(new Set(c).size).toBe(3);
    expect(statusColour('offered')).toBe(STATUS_COLOURS.offered);
    expect(statusColour('suspended')).toBe('#757575');
  });
});

describe('cell shading', () => {
  it('shades by open requests first, then by drivers, darker with more', () => {
    const quiet = cellStyle({ available: 1, offered: 0, on_trip: 0, open_requests: 0 });
    const busy = cellStyle({ available: 40, offered: 0, on_trip: 0, open_requests: 0 });
    const wanted = cellStyle({ available: 40, offered: 0, on_trip: 0, open_requests: 3 });
    expect(busy.fillOpacity).toBeGreaterThan(quiet.fillOpacity);
    expect(wanted.fillColor).not.toBe(busy.fillColor);
    expect(cellStyle({ available: 100000 }).fillOpacity).toBeLessThanOrEqual(0.6);
    expect(cellStyle({}).fillOpacity).toBe(0.05);
  });
  it('draws pinned surge apart from computed surge', () => {
    expect(surgeStyle(2, true).dashArray).toBeTruthy();
    expect(surgeStyle(2, false).dashArray).toBeNull();
    expect(surgeStyle(3, false).color).not.toBe(surgeStyle(1.2, false).color);
  });
});

describe('headings', () => {
  it('points north, east, south', () => {
    const [nlat, nlng] = headingEnd(45, -73, 0, 1000);
    expect(nlat).toBeGreaterThan(45);
    expect(nlng).toBeCloseTo(-73, 6);
    const [elat, elng] = headingEnd(45, -73, 90, 1000);
    expect(elng).toBeGreaterThan(-73);
    expect(elat).toBeCloseTo(45, 3);
    const [slat] = headingEnd(45, -73, 180, 1000);
    expect(slat).toBeLessThan(45);
    // 1000 m north is about 0.009 degrees of latitude.
    expect(nlat - 45).toBeCloseTo(0.008993, 5);
  });
});

describe('graticule', () => {
  it('keeps the number of lines bounded at every span', () => {
    for (const span of [360, 90, 7, 1, 0.3, 0.01, 0.0005]) {
      const step = graticuleStep(span);
      expect(span / step).toBeLessThanOrEqual(12);
    }
    const { lines, step } = graticuleLines({ south: 45.4, west: -73.8, north: 45.7, east: -73.4 });
    expect(step).toBe(0.05);
    expect(lines.length).toBeGreaterThan(4);
    expect(lines.length).toBeLessThanOrEqual(26);
  });
});

describe('view', () => {
  it('is clamped to the globe and to whole zooms', () => {
    expect(viewOf(-95, -200, 95, 200, 3.6)).toEqual({
      type: 'view', south: -90, west: -180, north: 90, east: 180, zoom: 4,
    });
  });
});

describe('search', () => {
  it('reads ids and states', () => {
    expect(parseSearch(' trp_1 ')).toEqual({ kind: 'trip', id: 'trp_1' });
    expect(parseSearch('rdr_a')).toEqual({ kind: 'list', query: 'rider_id=rdr_a' });
    expect(parseSearch('drv_b')).toEqual({ kind: 'list', query: 'driver_id=drv_b' });
    expect(parseSearch('dispatching')).toEqual({ kind: 'list', query: 'state=dispatching' });
    expect(parseSearch('')).toEqual({ kind: 'list', query: '' });
    expect(parseSearch('bogus').kind).toBe('invalid');
  });
});

describe('errors and numbers', () => {
  it('shows the server error as the server said it', () => {
    expect(errorText(409, { error: { code: 'conflict', message: 'the trip is completed' } }))
      .toBe('409 conflict: the trip is completed');
    expect(errorText(502, null)).toBe('502: the server answered without an error body');
  });
  it('formats', () => {
    expect(ms(null)).toBe('–');
    expect(ms(3.14)).toBe('3.1 ms');
    expect(ms(123.6)).toBe('124 ms');
    expect(percent(0.456)).toBe('46 %');
    expect(percent(null)).toBe('–');
  });
});
