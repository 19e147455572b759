//! Opaque identifiers. The engine never makes them (that needs randomness); callers do.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(transparent))]
        pub struct $name(String);

        impl $name {
            /// The prefix ids of this kind carry on the wire (`drv_`, `rdr_`, ...).
            pub const PREFIX: &'static str = $prefix;

            /// Wraps an id string as it came from a caller or the wire.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            /// Makes an id from a random suffix chosen by the caller.
            pub fn with_suffix(suffix: &str) -> Self {
                Self(format!("{}{}", $prefix, suffix))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A driver's id (`drv_…`).
    DriverId,
    "drv_"
);
id_type!(
    /// A rider's id (`rdr_…`).
    RiderId,
    "rdr_"
);
id_type!(
    /// A trip's id (`trp_…`).
    TripId,
    "trp_"
);
id_type!(
    /// A quote's id (`qte_…`).
    QuoteId,
    "qte_"
);
