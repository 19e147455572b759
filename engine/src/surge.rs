//! Surge pricing per H3 cell, at a resolution coarser than matching.
//!
//! Each surge cell counts ride requests over a sliding window (demand) and is told how
//! many drivers are available in it (supply). At every update its multiplier moves part
//! of the way toward the target that demand over supply asks for, by at most
//! `max_change` per update (so it cannot flap), and is shown rounded to `step`, within
//! [1, `cap`]. An operator can pin one cell's multiplier (an event) or cap every cell
//! (a city-wide cap); a pin is capped too.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::geo::{CellId, Point};

/// How surge is computed. Multipliers are plain factors (1.0 = no surge).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SurgeConfig {
    /// H3 resolution of surge cells (coarser than the matching grid).
    pub resolution: u8,
    /// Requests in this window count as demand.
    pub window_ms: u64,
    /// Multipliers are shown and charged in steps of this size.
    pub step: f64,
    /// The highest multiplier, ever.
    pub cap: f64,
    /// How much of the gap to the target one update closes (0, 1].
    pub smoothing: f64,
    /// The most one update may move a multiplier.
    pub max_change: f64,
    /// Target = 1 + sensitivity × (demand / supply − 1), when demand exceeds supply.
    pub sensitivity: f64,
}

impl Default for SurgeConfig {
    fn default() -> Self {
        Self {
            resolution: 6,
            window_ms: 5 * 60_000,
            step: 0.1,
            cap: 3.0,
            smoothing: 0.5,
            max_change: 0.3,
            sensitivity: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SurgeError {
    #[error("a multiplier must be a finite number from 1.0 to {cap}, got {got}")]
    OutOfRange { got: f64, cap: f64 },
}

impl SurgeConfig {
    /// Checks the configuration; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |c: bool, what: &str| if c { Ok(()) } else { Err(what.to_owned()) };
        ok(self.resolution <= 15, "surge resolution must be 0..=15")?;
        ok(self.window_ms > 0, "surge window must be positive")?;
        ok(
            self.step.is_finite() && self.step > 0.0 && self.step <= 1.0,
            "surge step must be in (0, 1]",
        )?;
        ok(
            self.cap.is_finite() && (1.0..=10.0).contains(&self.cap),
            "surge cap must be from 1.0 to 10.0",
        )?;
        let steps = (self.cap - 1.0) / self.step;
        ok(
            (steps - steps.round()).abs() < 1e-6,
            "surge cap must be 1.0 plus a whole number of steps",
        )?;
        ok(
            self.smoothing.is_finite() && self.smoothing > 0.0 && self.smoothing <= 1.0,
            "surge smoothing must be in (0, 1]",
        )?;
        ok(
            self.max_change.is_finite() && self.max_change >= self.step,
            "surge max change must be at least one step",
        )?;
        ok(
            self.sensitivity.is_finite() && self.sensitivity >= 0.0,
            "surge sensitivity must be finite and not negative",
        )
    }

    /// The surge cell of a (finer) matching cell: its parent at the surge resolution;
    /// itself when already as coarse.
    pub fn surge_cell(&self, cell: CellId) -> CellId {
        match h3o::Resolution::try_from(self.resolution) {
            Ok(res) => cell.parent(res).unwrap_or(cell),
            Err(_) => cell,
        }
    }

    /// The multiplier `demand` requests over `supply` available drivers ask for.
    pub fn target(&self, demand: u32, supply: u32) -> f64 {
        let ratio = f64::from(demand) / f64::from(supply.max(1));
        (1.0 + self.sensitivity * (ratio - 1.0)).clamp(1.0, self.cap)
    }

    /// `m` rounded down to a step, within [1, cap].
    pub fn stepped_down(&self, m: f64) -> f64 {
        let steps = ((m - 1.0) / self.step + 1e-9).floor();
        let v = ((1.0 + steps * self.step) * 1e6).round() / 1e6;
        v.clamp(1.0, self.cap)
    }

    /// `m` rounded to the nearest step, within [1, cap].
    pub fn stepped(&self, m: f64) -> f64 {
        let steps = ((m - 1.0) / self.step).round();
        // Round the float noise of `1 + n × 0.1` away, so 1.3 prints as 1.3.
        let v = ((1.0 + steps * self.step) * 1e6).round() / 1e6;
        v.clamp(1.0, self.cap)
    }
}

#[derive(Debug, Clone, Default)]
struct CellSurge {
    /// Request times in the window, oldest first.
    requests: VecDeque<u64>,
    /// The smoothed, unrounded multiplier.
    level: f64,
}

/// One surge cell as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SurgeCell {
    pub cell: CellId,
    /// Requests in the window.
    pub demand: u32,
    /// Available drivers at the last update.
    pub supply: u32,
    /// The multiplier computed from demand and supply (stepped, capped).
    pub computed: f64,
    /// An operator's pin, if any.
    pub pinned: Option<f64>,
    /// What quotes in the cell are priced with.
    pub multiplier: f64,
}

/// The surge state of a city.
#[derive(Debug, Clone)]
pub struct SurgeBook {
    cfg: SurgeConfig,
    cells: HashMap<CellId, CellSurge>,
    supply: HashMap<CellId, u32>,
    pins: BTreeMap<CellId, f64>,
    city_cap: Option<f64>,
}

impl SurgeBook {
    pub fn new(cfg: SurgeConfig) -> Self {
        Self {
            cfg,
            cells: HashMap::new(),
            supply: HashMap::new(),
            pins: BTreeMap::new(),
            city_cap: None,
        }
    }

    pub fn config(&self) -> &SurgeConfig {
        &self.cfg
    }

    /// The surge cell a point is in.
    pub fn cell_of(&self, p: Point) -> CellId {
        crate::geo::Grid::new(self.cfg.resolution)
            .expect("validated resolution")
            .cell_of(p)
    }

    /// The surge cell of a (finer) matching cell; itself when already as coarse.
    pub fn surge_cell(&self, cell: CellId) -> CellId {
        self.cfg.surge_cell(cell)
    }

    fn check(&self, m: f64) -> Result<f64, SurgeError> {
        if m.is_finite() && (1.0..=self.cfg.cap).contains(&m) {
            Ok(m)
        } else {
            Err(SurgeError::OutOfRange {
                got: m,
                cap: self.cfg.cap,
            })
        }
    }

    /// A ride was requested at `pickup`.
    pub fn record_request(&mut self, pickup: Point, now_ms: u64) {
        self.record_request_in(self.cell_of(pickup), now_ms);
    }

    /// A ride was requested in surge cell `cell`. (H3 is not exactly nested: a caller
    /// that works in matching cells passes `surge_cell(matching cell)` here and to
    /// `multiplier`, so a matching cell always has one surge cell.)
    pub fn record_request_in(&mut self, cell: CellId, now_ms: u64) {
        let c = self.cells.entry(cell).or_insert_with(|| CellSurge {
            requests: VecDeque::new(),
            level: 1.0,
        });
        c.requests.push_back(now_ms);
    }

    /// Recomputes every cell from its demand and `supply` (available drivers per surge
    /// cell). Cells back at 1.0 with no demand are forgotten.
    pub fn update(&mut self, now_ms: u64, supply: HashMap<CellId, u32>) {
        let cfg = self.cfg;
        let since = now_ms.saturating_sub(cfg.window_ms);
        for (cell, c) in self.cells.iter_mut() {
            while c.requests.front().is_some_and(|t| *t < since) {
                c.requests.pop_front();
            }
            let demand = c.requests.len() as u32;
            // Toward the stepped target: a target between two steps is still reached.
            let target = cfg.stepped(cfg.target(demand, supply.get(cell).copied().unwrap_or(0)));
            let moved = (target - c.level) * cfg.smoothing;
            c.level = (c.level + moved.clamp(-cfg.max_change, cfg.max_change)).clamp(1.0, cfg.cap);
            if (c.level - target).abs() < 1e-9 {
                c.level = target;
            }
        }
        // A cell without demand whose multiplier shows as 1.0 again is forgotten.
        self.cells
            .retain(|_, c| !c.requests.is_empty() || cfg.stepped(c.level) > 1.0);
        self.supply = supply;
    }

    fn computed(&self, cell: CellId) -> f64 {
        self.cells
            .get(&cell)
            .map_or(1.0, |c| self.cfg.stepped(c.level))
    }

    /// The multiplier quotes at `pickup` are priced with.
    pub fn multiplier_at(&self, pickup: Point) -> f64 {
        self.multiplier(self.cell_of(pickup))
    }

    /// The multiplier of a surge cell: its pin or its computed value, under the city cap.
    pub fn multiplier(&self, cell: CellId) -> f64 {
        let m = self
            .pins
            .get(&cell)
            .copied()
            .unwrap_or_else(|| self.computed(cell));
        match self.city_cap {
            Some(cap) => m.min(cap),
            None => m,
        }
    }

    /// Pins (`Some`) or unpins (`None`) a surge cell's multiplier.
    pub fn pin(&mut self, cell: CellId, multiplier: Option<f64>) -> Result<(), SurgeError> {
        match multiplier {
            Some(m) => {
                let m = self.cfg.stepped(self.check(m)?);
                self.pins.insert(cell, m);
            }
            None => {
                self.pins.remove(&cell);
            }
        }
        Ok(())
    }

    /// Sets (`Some`) or lifts (`None`) the city-wide cap, rounded down to a step (a cap is
    /// never exceeded).
    pub fn set_city_cap(&mut self, cap: Option<f64>) -> Result<(), SurgeError> {
        self.city_cap = cap
            .map(|c| self.check(c).map(|c| self.cfg.stepped_down(c)))
            .transpose()?;
        Ok(())
    }

    pub fn city_cap(&self) -> Option<f64> {
        self.city_cap
    }

    pub fn pins(&self) -> &BTreeMap<CellId, f64> {
        &self.pins
    }

    /// Every cell with demand, a multiplier above 1 or a pin, in H3 index order.
    pub fn cells(&self) -> Vec<SurgeCell> {
        let mut ids: Vec<CellId> = self.cells.keys().chain(self.pins.keys()).copied().collect();
        ids.sort_unstable_by_key(|c| u64::from(*c));
        ids.dedup();
        ids.into_iter()
            .map(|cell| SurgeCell {
                cell,
                demand: self.cells.get(&cell).map_or(0, |c| c.requests.len() as u32),
                supply: self.supply.get(&cell).copied().unwrap_or(0),
                computed: self.computed(cell),
                pinned: self.pins.get(&cell).copied(),
                multiplier: self.multiplier(cell),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Point {
        Point::new(45.5017, -73.5673).unwrap()
    }

    #[test]
    fn demand_over_supply_raises_surge_gradually_and_it_falls_back() {
        let cfg = SurgeConfig::default();
        let mut b = SurgeBook::new(cfg);
        let cell = b.cell_of(p());
        for i in 0..40 {
            b.record_request(p(), i * 1000);
        }
        let supply = HashMap::from([(cell, 10)]);
        let mut seen = vec![];
        for t in 0..8 {
            b.update(40_000 + t * 10_000, supply.clone());
            seen.push(b.multiplier(cell));
        }
        // Target: 1 + 0.5 × (40/10 − 1) = 2.5, reached by steps of at most 0.3.
        assert_eq!(seen[0], 1.3, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] >= w[0]), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 2.5, "{seen:?}");
        // The window passes: demand is gone, surge comes down and the cell is forgotten.
        for t in 0..20 {
            b.update(1_000_000 + t * 10_000, supply.clone());
        }
        assert_eq!(b.multiplier(cell), 1.0);
        assert!(b.cells().is_empty());
    }

    #[test]
    fn pins_and_the_city_cap_override_the_computed_value() {
        let mut b = SurgeBook::new(SurgeConfig::default());
        let cell = b.cell_of(p());
        b.pin(cell, Some(2.04)).unwrap();
        assert_eq!(b.multiplier(cell), 2.0);
        b.set_city_cap(Some(1.5)).unwrap();
        assert_eq!(b.multiplier(cell), 1.5);
        assert!(b.pin(cell, Some(0.5)).is_err());
        assert!(b.pin(cell, Some(f64::NAN)).is_err());
        assert!(b.set_city_cap(Some(3.5)).is_err());
        b.pin(cell, None).unwrap();
        b.set_city_cap(None).unwrap();
        assert_eq!(b.multiplier(cell), 1.0);
    }
}
