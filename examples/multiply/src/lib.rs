//! Example activity `multiply`: returns `x * factor`. The benchmark guest, so it makes no
//! host call at all.

use bgw_guest::{Context, Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Payload {
    x: i64,
    #[serde(default = "default_factor")]
    factor: i64,
}

fn default_factor() -> i64 {
    2
}

#[derive(Serialize)]
struct Product {
    product: i64,
}

fn multiply(_ctx: &mut Context, payload: Payload) -> Result<Product> {
    let product = checked_product(payload.x, payload.factor)?;
    Ok(Product { product })
}

fn checked_product(x: i64, factor: i64) -> Result<i64> {
    x.checked_mul(factor).ok_or_else(|| {
        Error::invalid_input(format!(
            "product of x = {x} and factor = {factor} overflows a 64-bit signed integer"
        ))
    })
}

bgw_guest::export_activity!(multiply);

// Native tests: `cargo test -p multiply --target x86_64-unknown-linux-gnu`.
#[cfg(test)]
mod tests {
    use super::*;
    use bgw_guest::ErrorKind;

    #[test]
    fn product_of_small_values() {
        assert_eq!(checked_product(21, 2), Ok(42));
        assert_eq!(checked_product(-3, 7), Ok(-21));
    }

    #[test]
    fn overflow_is_invalid_input_naming_values() {
        let error = checked_product(i64::MAX, 2).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            error.message(),
            "product of x = 9223372036854775807 and factor = 2 overflows a 64-bit signed integer"
        );
    }
}
