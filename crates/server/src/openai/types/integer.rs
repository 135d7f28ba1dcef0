//! Integer request fields read as JSON Schema defines an integer: any number with no
//! fractional part, so `16`, `16.0` and `1.6e1` are all 16 (a client that writes numbers as
//! floats, and the OpenAPI document that calls these fields integers, agree with the server).
//!
//! Invariant: a number is accepted iff it is an integer literal within `i64` or a whole float
//! of magnitude at most 2^53 (where floats are exact); anything else is a serde error naming
//! the field.

use serde::Deserialize;
use serde::de::{Deserializer, Error};
use serde_json::Number;

/// The integer a JSON number stands for, if it is one (see the module invariant).
pub fn whole(n: &Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    // Past 2^53 a float no longer holds every integer: it may be an integer literal outside
    // `i64` rounded into it (serde_json reads those as floats), so it is refused.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    n.as_f64()
        .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
        .map(|f| f as i64)
}

fn convert<E: Error>(n: Number) -> Result<i64, E> {
    whole(&n).ok_or_else(|| E::custom(format!("invalid value: {n}, expected an integer")))
}

/// `deserialize_with` for an optional integer.
pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<Number>::deserialize(d)?.map(convert).transpose()
}

/// `deserialize_with` for an optional list of integers.
pub fn option_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<i64>>, D::Error> {
    Option::<Vec<Number>>::deserialize(d)?
        .map(|list| list.into_iter().map(convert).collect())
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "option")]
        n: Option<i64>,
        #[serde(default, deserialize_with = "option_list")]
        ids: Option<Vec<i64>>,
    }

    fn n(v: serde_json::Value) -> Result<Option<i64>, String> {
        serde_json::from_value::<T>(json!({ "n": v }))
            .map(|t| t.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn whole_numbers_in_any_notation_are_integers() {
        assert_eq!(n(json!(16)), Ok(Some(16)));
        assert_eq!(n(json!(16.0)), Ok(Some(16)));
        assert_eq!(n(json!(-1.0)), Ok(Some(-1)));
        assert_eq!(n(json!(null)), Ok(None));
        let t: T = serde_json::from_str(r#"{"ids": [1e3, 2, 3.0]}"#).expect("whole");
        assert_eq!(t.ids, Some(vec![1000, 2, 3]));
        assert!(serde_json::from_str::<T>("{}").expect("absent").n.is_none());
    }

    #[test]
    fn fractions_strings_and_out_of_range_are_refused() {
        for bad in [
            json!(1.5),
            json!("3"),
            json!(9.3e18),
            json!(18446744073709551615_u64),
        ] {
            assert!(n(bad.clone()).is_err(), "{bad}");
        }
        // Below i64::MIN: serde_json reads it as the float -2^63, which must not become i64::MIN.
        let below: T = serde_json::from_str(r#"{"n": -9223372036854775808}"#).expect("i64::MIN");
        assert_eq!(below.n, Some(i64::MIN));
        assert!(serde_json::from_str::<T>(r#"{"n": -9223372036854775809}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"n": 9223372036854775808}"#).is_err());
        let err = serde_json::from_value::<T>(json!({"ids": [1, 2.5]})).err();
        assert!(err.is_some());
    }
}
