//! Who drivers and riders are: registration data, plain values.

use crate::fare::Product;
use crate::geo::Point;

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Vehicle {
    pub make: String,
    pub model: String,
    pub plate: String,
    pub color: String,
    pub product: Product,
    pub seats: u8,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DriverProfile {
    pub name: String,
    pub vehicle: Vehicle,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RiderProfile {
    pub name: String,
    pub phone: String,
}

/// The driver as a rider sees it on the trip.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TripDriver {
    pub name: String,
    pub vehicle: Vehicle,
    pub location: Option<Point>,
}
