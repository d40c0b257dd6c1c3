//! The context-sensitive tasks (level CS): strings written twice or reordered, binary
//! arithmetic on little-endian numbers (sum, product), the integer square root and sorting.
//!
//! Each generator draws the input of length `L` and returns `(input, target)`; `U{a..b}` is
//! uniform on `a..=b`.

use num_bigint::BigUint;

use super::{Rng, TERMINATOR};

/// duplicate_string: `x ~ U{0,1}^L`; `y = x ++ x`.
pub(super) fn duplicate_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let y = [x.as_slice(), x.as_slice()].concat();
    (x, y)
}

/// missing_duplicate_string: ids 0/1, 2 hole, 3 pad.
///
/// `L = 1`: input `[1]`, `y = 1`. Otherwise `s ~ U{0,1}^{floor(L/2)}`, `d = s ++ s`,
/// `i ~ U{0..len(d)-1}`, `y = d_i`, `d_i := 2`, and a 3 is appended when `L` is odd.
pub(super) fn missing_duplicate_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    if length == 1 {
        return (vec![1], vec![1]);
    }
    let s = rng.bits(length / 2);
    let mut d = [s.as_slice(), s.as_slice()].concat();
    let hole = rng.index(d.len());
    let missing = d[hole];
    d[hole] = 2;
    if length % 2 == 1 {
        d.push(3);
    }
    (d, vec![missing])
}

/// odds_first: `x ~ U{0,1}^L`; `y = x[1::2] ++ x[0::2]` (0-based odd positions first).
pub(super) fn odds_first(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let odds = x.iter().skip(1).step_by(2);
    let evens = x.iter().step_by(2);
    let y = odds.chain(evens).copied().collect();
    (x, y)
}

/// The little-endian bits of `n` without trailing zeros; zero is `[0]`.
pub(super) fn minimal_le_bits(n: &BigUint) -> Vec<i64> {
    if n.bits() == 0 {
        return vec![0];
    }
    (0..n.bits()).map(|i| i64::from(n.bit(i))).collect()
}

/// The operands of binary_addition and binary_multiplication for `L >= 3`: `a ~ U{1..L-2}`,
/// `b = L - 1 - a`, `n ~ U{1..2^a-1}`, `m ~ U{1..2^b-1}`; the input is `n` in `a` little-endian
/// bits, 2, `m` in `b` little-endian bits.
fn binary_operands(length: usize, rng: &mut Rng) -> (Vec<i64>, BigUint, BigUint) {
    let a = rng.between(1, length - 2);
    let b = length - 1 - a;
    let n = rng.nonzero_biguint(a);
    let m = rng.nonzero_biguint(b);
    let mut x = Vec::with_capacity(length);
    x.extend((0..a as u64).map(|i| i64::from(n.bit(i))));
    x.push(TERMINATOR);
    x.extend((0..b as u64).map(|i| i64::from(m.bit(i))));
    (x, n, m)
}

/// The short input of binary_addition and binary_multiplication for `L <= 2`:
/// `n ~ U{0..2^L-2}` in `L` little-endian bits. Returns the input and `n`.
fn short_binary_input(length: usize, rng: &mut Rng) -> (Vec<i64>, u64) {
    let n = rng.range_inclusive(0, (1 << length) - 2);
    let x = (0..length).map(|i| ((n >> i) & 1) as i64).collect();
    (x, n)
}

/// `bits ++ [2]`, zero-padded to `len`.
fn terminated(mut bits: Vec<i64>, len: usize) -> Vec<i64> {
    bits.push(TERMINATOR);
    bits.resize(len, 0);
    bits
}

/// binary_addition: little-endian numbers, id 2 separator and terminator.
///
/// `L <= 2`: `n ~ U{0..2^L-2}` in `L` bits; output = `n` without trailing zeros, 2, zeros up to
/// `L + 1`. `L >= 3`: input `n 2 m` (see [`binary_operands`]); output = `n + m` without
/// trailing zeros, 2, zeros up to `L + 1`.
pub(super) fn binary_addition(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    if length <= 2 {
        let (x, n) = short_binary_input(length, rng);
        let y = terminated(minimal_le_bits(&BigUint::from(n)), length + 1);
        return (x, y);
    }
    let (x, n, m) = binary_operands(length, rng);
    let y = terminated(minimal_le_bits(&(n + m)), length + 1);
    (x, y)
}

/// binary_multiplication: as binary_addition with the product `n * m`, padded to `L`.
///
/// `L <= 2`: the input as binary_addition's short case, output `[0; L-1] ++ [2]`.
pub(super) fn binary_multiplication(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    if length <= 2 {
        let (x, _) = short_binary_input(length, rng);
        return (x, terminated(vec![0; length - 1], length));
    }
    let (x, n, m) = binary_operands(length, rng);
    let y = terminated(minimal_le_bits(&(n * m)), length);
    (x, y)
}

/// compute_sqrt: `n ~ U{1..2^L-1}` in `L` big-endian bits; `y = floor(sqrt(n))` in
/// `ceil(L/2)` big-endian bits.
pub(super) fn compute_sqrt(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let n = rng.nonzero_biguint(length);
    let root = n.sqrt();
    let big_endian = |value: &BigUint, bits: usize| -> Vec<i64> {
        (0..bits as u64)
            .rev()
            .map(|i| i64::from(value.bit(i)))
            .collect()
    };
    (
        big_endian(&n, length),
        big_endian(&root, length.div_ceil(2)),
    )
}

/// bucket_sort: `x ~ U{0..4}^L`; `y` = `x` sorted ascending.
pub(super) fn bucket_sort(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x: Vec<i64> = (0..length).map(|_| rng.token(5)).collect();
    let mut y = x.clone();
    y.sort_unstable();
    (x, y)
}
