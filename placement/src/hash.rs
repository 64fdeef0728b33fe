//! Stable hashing and the fixed-point straw2 draw.
//!
//! Every node that holds the same map must compute the same placement, on any
//! CPU and any libm, so nothing here uses floating point: the logarithm behind
//! straw2 comes from an integer table built at compile time.

/// The 64-bit finaliser of MurmurHash3: a cheap, well-mixing bijection.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Hashes two words. Used for object -> PG and for placement keys.
#[inline]
pub fn hash2(a: u64, b: u64) -> u64 {
    mix64(a ^ mix64(b ^ 0x9e37_79b9_7f4a_7c15))
}

/// Hashes three words. Used for the per-item straw2 draws.
#[inline]
pub fn hash3(a: u64, b: u64, c: u64) -> u64 {
    mix64(a ^ mix64(b ^ mix64(c ^ 0x632b_e59b_d9b4_e019)))
}

/// Fraction bits of the log table: entry `i` is `log2(1 + i / 2^TABLE_BITS)`.
const TABLE_BITS: u32 = 10;
const TABLE_LEN: usize = (1 << TABLE_BITS) + 1;

/// `log2(1 + i / 1024)` in Q32 fixed point for `i` in `0..=1024`, computed
/// with integer arithmetic only (bit-by-bit squaring), so it is bit-exact
/// everywhere.
const LOG2_TABLE: [u64; TABLE_LEN] = build_log2_table();

const fn build_log2_table() -> [u64; TABLE_LEN] {
    let mut table = [0u64; TABLE_LEN];
    let mut i = 0;
    while i < TABLE_LEN {
        // y = 1 + i/1024 in Q62.
        let one: u128 = 1 << 62;
        let mut y: u128 = one + ((i as u128) << (62 - TABLE_BITS));
        let mut result: u64 = 0;
        if y >= 2 * one {
            // Only i == 1024: log2(2) == 1.
            table[i] = 1 << 32;
            i += 1;
            continue;
        }
        let mut bit = 0;
        while bit < 32 {
            y = (y * y) >> 62;
            if y >= 2 * one {
                y >>= 1;
                result |= 1 << (31 - bit);
            }
            bit += 1;
        }
        table[i] = result;
        i += 1;
    }
    table
}

/// Returns `log2((u + 1) / 2^32)` in Q32 fixed point: a value in
/// `[-32 * 2^32, 0]`, monotone in `u`. Linear interpolation between table
/// entries keeps the error below 1e-6 and the function monotone.
#[inline]
pub fn log2_unit_q32(u: u32) -> i64 {
    let x = u as u64 + 1; // 1 ..= 2^32
    let msb = 63 - x.leading_zeros(); // 0 ..= 32
    // Mantissa with the leading one at bit 63.
    let m = x << (63 - msb);
    let index = ((m >> (63 - TABLE_BITS)) & ((1 << TABLE_BITS) - 1)) as usize;
    let frac = (m >> (63 - TABLE_BITS - 32)) & 0xffff_ffff;
    let low = LOG2_TABLE[index];
    let high = LOG2_TABLE[index + 1];
    let interp = low + (((high - low) * frac) >> 32);
    ((msb as i64) << 32) + interp as i64 - (32i64 << 32)
}

/// Fixed-point weight unit: `WEIGHT_ONE` is a weight of 1.0.
pub const WEIGHT_ONE: u32 = 0x1_0000;

/// Precomputed `2^48 / weight`, so a straw2 draw is one multiplication.
#[inline]
pub fn inverse_weight(weight: u32) -> i64 {
    if weight == 0 {
        0
    } else {
        ((1u64 << 48) / weight as u64) as i64
    }
}

/// The straw2 draw of one item: `ln(u) / weight` up to a positive constant.
/// The largest draw wins. `inverse_weight == 0` (a zero weight) never wins.
#[inline]
pub fn straw2_draw(hash: u64, inverse_weight: i64) -> i64 {
    if inverse_weight == 0 {
        return i64::MIN;
    }
    let log = log2_unit_q32((hash >> 32) as u32); // <= 0, >= -2^37
    // |log| < 2^38 and inverse_weight <= 2^48 / 1: the product can exceed
    // i64, so compute in i128 and shift back into range (keeps ordering).
    ((log as i128 * inverse_weight as i128) >> 24) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_endpoints_are_exact() {
        assert_eq!(LOG2_TABLE[0], 0);
        assert_eq!(LOG2_TABLE[TABLE_LEN - 1], 1 << 32);
        // log2(1.5) = 0.584962500721156
        let half = LOG2_TABLE[512] as f64 / (1u64 << 32) as f64;
        assert!((half - 0.584_962_500_721_156).abs() < 1e-9, "{half}");
    }

    #[test]
    fn log2_is_accurate_and_monotone() {
        let mut previous = i64::MIN;
        for step in 0..100_000u64 {
            let u = (step * 42_949) as u32;
            let fixed = log2_unit_q32(u);
            assert!(fixed >= previous, "not monotone at {u}");
            previous = fixed;
            let exact = (((u as f64) + 1.0) / 4_294_967_296.0).log2();
            let got = fixed as f64 / (1u64 << 32) as f64;
            assert!((exact - got).abs() < 1e-6, "u={u} exact={exact} got={got}");
        }
        assert_eq!(log2_unit_q32(u32::MAX), 0);
        assert_eq!(log2_unit_q32(0), -(32i64 << 32));
    }

    #[test]
    fn heavier_items_win_in_proportion() {
        // Two items, weights 1 and 3: the heavy one must win about 75% of keys.
        let light = inverse_weight(WEIGHT_ONE);
        let heavy = inverse_weight(3 * WEIGHT_ONE);
        let trials = 200_000u64;
        let heavy_wins = (0..trials)
            .filter(|&key| {
                straw2_draw(hash3(key, 2, 0), heavy) > straw2_draw(hash3(key, 1, 0), light)
            })
            .count();
        let share = heavy_wins as f64 / trials as f64;
        assert!((share - 0.75).abs() < 0.01, "heavy share {share}");
    }

    #[test]
    fn zero_weight_never_wins() {
        for key in 0..1000 {
            assert!(straw2_draw(hash3(key, 1, 0), 0) < straw2_draw(hash3(key, 2, 0), 1));
        }
    }
}
