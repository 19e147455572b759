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

/// A registration field that breaks its rule; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` must be {rule}")]
pub struct ProfileError {
    pub field: &'static str,
    pub rule: String,
}

/// A name-like field: trimmed, 1 to `max_chars` characters, none of them control characters.
fn text(s: &str, field: &'static str, max_chars: usize) -> Result<String, ProfileError> {
    let t = s.trim();
    if t.is_empty() || t.chars().count() > max_chars || t.chars().any(char::is_control) {
        return Err(ProfileError {
            field,
            rule: format!("1 to {max_chars} printable characters"),
        });
    }
    Ok(t.to_owned())
}

impl RiderProfile {
    /// A rider's registration: a name of 1 to 100 printable characters and a phone
    /// number of 5 to 20 digits (spaces, `+-().` allowed between them, 32 characters at most).
    pub fn new(name: &str, phone: &str) -> Result<RiderProfile, ProfileError> {
        let name = text(name, "name", 100)?;
        let phone = phone.trim().to_owned();
        let digits = phone.chars().filter(char::is_ascii_digit).count();
        if !(5..=20).contains(&digits)
            || !phone
                .chars()
                .all(|c| c.is_ascii_digit() || " +-().".contains(c))
            || phone.len() > 32
        {
            return Err(ProfileError {
                field: "phone",
                rule: "a phone number of 5 to 20 digits".into(),
            });
        }
        Ok(RiderProfile { name, phone })
    }
}

/// What a driver registers, before its rules are checked.
#[derive(Debug, Clone, Copy)]
pub struct DriverForm<'a> {
    pub name: &'a str,
    pub make: &'a str,
    pub model: &'a str,
    pub plate: &'a str,
    pub color: &'a str,
    pub product: Product,
    pub seats: u8,
}

impl DriverProfile {
    /// A driver's registration: printable names within their lengths, 1 to 20 seats.
    pub fn new(f: DriverForm<'_>) -> Result<DriverProfile, ProfileError> {
        if !(1..=20).contains(&f.seats) {
            return Err(ProfileError {
                field: "vehicle.seats",
                rule: "1 to 20".into(),
            });
        }
        Ok(DriverProfile {
            name: text(f.name, "name", 100)?,
            vehicle: Vehicle {
                make: text(f.make, "vehicle.make", 64)?,
                model: text(f.model, "vehicle.model", 64)?,
                plate: text(f.plate, "vehicle.plate", 16)?,
                color: text(f.color, "vehicle.color", 32)?,
                product: f.product,
                seats: f.seats,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_rules_name_the_field_they_refuse() {
        assert_eq!(
            RiderProfile::new("  Ada ", "+1 (514) 555-0100").unwrap(),
            RiderProfile {
                name: "Ada".into(),
                phone: "+1 (514) 555-0100".into()
            }
        );
        assert_eq!(
            RiderProfile::new("", "5145550100").unwrap_err().field,
            "name"
        );
        assert_eq!(
            RiderProfile::new("Ada", "12-34").unwrap_err().field,
            "phone"
        );
        assert_eq!(
            RiderProfile::new("Ada", "514x5550100").unwrap_err().field,
            "phone"
        );
        let form = DriverForm {
            name: "Bo",
            make: "Toyota",
            model: "Prius",
            plate: "ABC 123",
            color: "blue",
            product: Product::Xl,
            seats: 6,
        };
        assert!(DriverProfile::new(form).is_ok());
        let e = DriverProfile::new(DriverForm { seats: 0, ..form }).unwrap_err();
        assert_eq!(e.to_string(), "`vehicle.seats` must be 1 to 20");
        let e = DriverProfile::new(DriverForm {
            plate: "A\u{7}",
            ..form
        })
        .unwrap_err();
        assert_eq!(e.field, "vehicle.plate");
    }
}
