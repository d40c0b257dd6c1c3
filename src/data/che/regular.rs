//! The regular tasks (level R): a finite automaton solves them.
//!
//! Each generator draws the input of length `L` and returns `(input, target)`; `U{a..b}` is
//! uniform on `a..=b`.

use super::{Rng, MODULUS};

/// even_pairs: `x ~ U{0,1}^L`; `y` = the number of `i` with `x_i != x_{i+1}`, mod 2.
pub(super) fn even_pairs(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let changes = x.windows(2).filter(|w| w[0] != w[1]).count() as i64;
    (x, vec![changes % 2])
}

/// modular_arithmetic: with `L` made odd (`L - 1` when even), digits `U{0..4}` at even positions
/// and operators `U{+ 5, - 6, * 7}` at odd positions (id 8 unused); `y` = the value with `*`
/// before `+`/`-`, left-associative, mod 5.
pub(super) fn modular_arithmetic(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let length = if length.is_multiple_of(2) {
        length - 1
    } else {
        length
    };
    let mut x = Vec::with_capacity(length);
    // The value so far is `sum + term`, where `term` is the product being built.
    let mut sum = 0;
    let mut term = rng.token(MODULUS);
    x.push(term);
    for _ in 0..length / 2 {
        let op = 5 + rng.token(3);
        let digit = rng.token(MODULUS);
        x.push(op);
        x.push(digit);
        match op {
            5 => {
                sum += term;
                term = digit;
            }
            6 => {
                sum += term;
                term = -digit;
            }
            _ => term *= digit,
        }
        sum = sum.rem_euclid(MODULUS);
        term = term.rem_euclid(MODULUS);
    }
    (x, vec![(sum + term).rem_euclid(MODULUS)])
}

/// parity_check: `x ~ U{0,1}^L`; `y = sum(x) mod 2`.
pub(super) fn parity_check(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let ones: i64 = x.iter().sum();
    (x, vec![ones % 2])
}

/// cycle_navigation: `t ~ U{0,1,2}^L` (steps -1, 0, +1); `y = sum(t - 1) mod 5`.
pub(super) fn cycle_navigation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let t: Vec<i64> = (0..length).map(|_| rng.token(3)).collect();
    let position: i64 = t.iter().map(|&s| s - 1).sum();
    (t, vec![position.rem_euclid(MODULUS)])
}
