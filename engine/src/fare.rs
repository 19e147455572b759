//! Products and upfront fares: base + per km + per minute, never below the minimum.

use std::fmt;
use std::str::FromStr;

use crate::eta::EtaEstimate;

/// The vehicle classes a rider can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Product {
    Economy,
    Xl,
    Premium,
}

impl Product {
    pub const ALL: [Product; 3] = [Product::Economy, Product::Xl, Product::Premium];

    pub fn as_str(self) -> &'static str {
        match self {
            Product::Economy => "economy",
            Product::Xl => "xl",
            Product::Premium => "premium",
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Product {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Product::ALL.into_iter().find(|p| p.as_str() == s).ok_or(())
    }
}

/// The prices of one product, in minor currency units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RateCard {
    pub base_cents: i64,
    pub per_km_cents: i64,
    pub per_minute_cents: i64,
    pub minimum_cents: i64,
    /// Added to every fare, after the minimum and never surged.
    pub booking_fee_cents: i64,
    /// What a rider's late cancel costs (paid to the driver).
    pub cancellation_fee_cents: i64,
}

/// The highest per-unit rate (cents) and minimum fare an operator may set.
pub const MAX_RATE_CENTS: i64 = 100_000;
pub const MAX_MINIMUM_CENTS: i64 = 1_000_000;

/// A rate card an operator may not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateCardError {
    #[error("{product}: {field} must be from 0 to {max}, got {got}")]
    OutOfRange {
        product: Product,
        /// The card's field, as named in [`RateCard`].
        field: &'static str,
        max: i64,
        got: i64,
    },
    #[error("{0}: base, per-km and per-minute rates cannot all be 0")]
    Free(Product),
}

impl RateCard {
    /// Every amount within its bound, and not free.
    pub fn check(&self, product: Product) -> Result<(), RateCardError> {
        let fields = [
            ("base_cents", self.base_cents, MAX_RATE_CENTS),
            ("per_km_cents", self.per_km_cents, MAX_RATE_CENTS),
            ("per_minute_cents", self.per_minute_cents, MAX_RATE_CENTS),
            ("minimum_cents", self.minimum_cents, MAX_MINIMUM_CENTS),
            ("booking_fee_cents", self.booking_fee_cents, MAX_RATE_CENTS),
            (
                "cancellation_fee_cents",
                self.cancellation_fee_cents,
                MAX_RATE_CENTS,
            ),
        ];
        for (field, got, max) in fields {
            if !(0..=max).contains(&got) {
                return Err(RateCardError::OutOfRange {
                    product,
                    field,
                    max,
                    got,
                });
            }
        }
        if self.base_cents == 0 && self.per_km_cents == 0 && self.per_minute_cents == 0 {
            return Err(RateCardError::Free(product));
        }
        Ok(())
    }
}

/// One rate card per product.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RateCards {
    pub currency: String,
    pub economy: RateCard,
    pub xl: RateCard,
    pub premium: RateCard,
}

impl Default for RateCards {
    fn default() -> Self {
        Self {
            currency: "USD".to_owned(),
            economy: RateCard {
                base_cents: 250,
                per_km_cents: 120,
                per_minute_cents: 30,
                minimum_cents: 700,
                booking_fee_cents: 0,
                cancellation_fee_cents: 500,
            },
            xl: RateCard {
                base_cents: 400,
                per_km_cents: 180,
                per_minute_cents: 45,
                minimum_cents: 1000,
                booking_fee_cents: 0,
                cancellation_fee_cents: 700,
            },
            premium: RateCard {
                base_cents: 700,
                per_km_cents: 300,
                per_minute_cents: 70,
                minimum_cents: 1500,
                booking_fee_cents: 0,
                cancellation_fee_cents: 1000,
            },
        }
    }
}

/// An upfront price for one trip.
#[derive(Debug, Clone, PartialEq)]
pub struct FareQuote {
    pub product: Product,
    pub fare_cents: i64,
    pub currency: String,
    pub surge: f64,
    pub distance_m: u64,
    pub duration_s: u64,
}

impl RateCards {
    /// Every product's card passes [`RateCard::check`].
    pub fn check(&self) -> Result<(), RateCardError> {
        Product::ALL
            .into_iter()
            .try_for_each(|p| self.card(p).check(p))
    }

    pub fn card(&self, product: Product) -> &RateCard {
        match product {
            Product::Economy => &self.economy,
            Product::Xl => &self.xl,
            Product::Premium => &self.premium,
        }
    }

    /// The fare for a trip of the estimated length: base + distance + time rounded to the
    /// nearest minor unit, times `surge` (clamped to ≥ 1) rounded down, never below the
    /// product's minimum, plus the booking fee. So it is monotone in distance and duration, never
    /// below minimum + booking fee, and never more than `surge` × the fare without surge.
    pub fn quote(&self, product: Product, trip: EtaEstimate, surge: f64) -> FareQuote {
        let card = self.card(product);
        let km = trip.distance_m / 1000.0;
        let minutes = trip.duration_s / 60.0;
        let raw = card.base_cents as f64
            + km * card.per_km_cents as f64
            + minutes * card.per_minute_cents as f64;
        // Surge multiplies the rounded fare and the result is rounded down, so a surged
        // fare is never more than `surge` times the unsurged one. (The 1e-6 absorbs float
        // noise: a whole number of cents times a tenth-step surge is a whole tenth.)
        let surged = (raw.round() * surge.max(1.0) + 1e-6).floor() as i64;
        FareQuote {
            product,
            fare_cents: surged.max(card.minimum_cents) + card.booking_fee_cents,
            currency: self.currency.clone(),
            surge: surge.max(1.0),
            distance_m: trip.distance_m.round() as u64,
            duration_s: trip.duration_s.round() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fare_is_base_plus_distance_plus_time_with_a_minimum() {
        let cards = RateCards::default();
        let q = cards.quote(
            Product::Economy,
            EtaEstimate {
                distance_m: 10_000.0,
                duration_s: 1200.0,
            },
            1.0,
        );
        assert_eq!(q.fare_cents, 250 + 1200 + 600);
        let short = cards.quote(
            Product::Economy,
            EtaEstimate {
                distance_m: 100.0,
                duration_s: 30.0,
            },
            1.0,
        );
        assert_eq!(short.fare_cents, 700);
        let surged = cards.quote(
            Product::Economy,
            EtaEstimate {
                distance_m: 10_000.0,
                duration_s: 1200.0,
            },
            1.5,
        );
        assert_eq!(surged.fare_cents, 3075);
    }

    #[test]
    fn products_round_trip_their_names() {
        for p in Product::ALL {
            assert_eq!(p.as_str().parse::<Product>(), Ok(p));
        }
        assert!("limo".parse::<Product>().is_err());
    }
}
