//! The deterministic context-free tasks (level DCF): a deterministic pushdown automaton
//! solves them. Two of them share the random bracketed expressions of [`bracket_expression`].
//!
//! Each generator draws the input of length `L` and returns `(input, target)`; `U{a..b}` is
//! uniform on `a..=b`.

use super::{Rng, MODULUS, TERMINATOR};

/// stack_manipulation: ids 0/1 symbols, 2 POP, 3 PUSH 0, 4 PUSH 1.
///
/// `L = 1`: input `[b]`, `b ~ U{0,1}`, output `[b, 2]`. Otherwise `s ~ U{1..L-1}`, the initial
/// stack `U{0,1}^s` (bottom to top), then `L - s` actions `U{2,3,4}`; a POP on the empty stack is
/// ignored. Output: the final stack top to bottom, 2, then zeros up to `L + 1`.
pub(super) fn stack_manipulation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    if length == 1 {
        let b = rng.bit();
        return (vec![b], vec![b, TERMINATOR]);
    }
    let initial = rng.between(1, length - 1);
    let mut x = rng.bits(initial);
    let mut stack = x.clone();
    for _ in initial..length {
        let action = 2 + rng.token(3);
        x.push(action);
        match action {
            2 => {
                stack.pop();
            }
            3 => stack.push(0),
            _ => stack.push(1),
        }
    }
    let mut y: Vec<i64> = stack.into_iter().rev().collect();
    y.push(TERMINATOR);
    y.resize(length + 1, 0);
    (x, y)
}

/// reverse_string: `x ~ U{0,1}^L`; `y` = `x` reversed.
pub(super) fn reverse_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let y = x.iter().rev().copied().collect();
    (x, y)
}

/// Token ids of a bracketed expression (digits are always 0-4).
struct BracketIds {
    plus: i64,
    minus: i64,
    /// `None` when the expressions use only `+` and `-`.
    times: Option<i64>,
    open: i64,
    close: i64,
}

/// The ids of modular_arithmetic_brackets.
const ARITHMETIC_IDS: BracketIds = BracketIds {
    plus: 5,
    minus: 6,
    times: Some(7),
    open: 8,
    close: 9,
};

/// The ids of solve_equation.
const EQUATION_IDS: BracketIds = BracketIds {
    plus: 5,
    minus: 6,
    times: None,
    open: 7,
    close: 8,
};

/// Appends a random bracketed expression of exactly `length` (>= 1) tokens to `out` and returns
/// its value mod 5 (in `0..5`).
///
/// `gen(1) = d`, `gen(2) = -d`, `gen(3) = (d)`, `gen(4) = (-d)`, and for `L >= 5`:
/// `a ~ U{1..L-4}`, `b = L - 3 - a`, `op` uniform over the operators of `ids`,
/// `( gen(a) op gen(b) )`; digits `d ~ U{0..4}`.
fn bracket_expression(length: usize, ids: &BracketIds, rng: &mut Rng, out: &mut Vec<i64>) -> i64 {
    match length {
        1 | 2 => {
            let digit = rng.token(MODULUS);
            if length == 2 {
                out.push(ids.minus);
            }
            out.push(digit);
            if length == 2 {
                (-digit).rem_euclid(MODULUS)
            } else {
                digit
            }
        }
        3 | 4 => {
            out.push(ids.open);
            let value = bracket_expression(length - 2, ids, rng, out);
            out.push(ids.close);
            value
        }
        _ => {
            let left_len = rng.between(1, length - 4);
            let right_len = length - 3 - left_len;
            let op = match ids.times {
                Some(times) => [ids.plus, ids.minus, times][rng.index(3)],
                None => [ids.plus, ids.minus][rng.index(2)],
            };
            out.push(ids.open);
            let left = bracket_expression(left_len, ids, rng, out);
            out.push(op);
            let right = bracket_expression(right_len, ids, rng, out);
            out.push(ids.close);
            let value = if op == ids.plus {
                left + right
            } else if op == ids.minus {
                left - right
            } else {
                left * right
            };
            value.rem_euclid(MODULUS)
        }
    }
}

/// modular_arithmetic_brackets: ids 0-4 digits, 5 `+`, 6 `-`, 7 `*`, 8 `(`, 9 `)`; the input is
/// a random bracketed expression of length `L` (see [`bracket_expression`]); `y` = its value
/// mod 5, unary minus negating.
pub(super) fn modular_arithmetic_brackets(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let mut x = Vec::with_capacity(length);
    let value = bracket_expression(length, &ARITHMETIC_IDS, rng, &mut x);
    (x, vec![value])
}

/// solve_equation: ids 0-4 digits, 5 `+`, 6 `-`, 7 `(`, 8 `)`, 9 `x`, 10 `=`.
///
/// `L < 3`: all zeros, `y = 0`. Otherwise `e` = a bracketed expression of length `L - 2` with
/// only `+` and `-`; from a uniform index of `e`, the first digit at or cyclically after it is
/// replaced by `x`; input = `e = value(e) mod 5`; `y` = the replaced digit.
pub(super) fn solve_equation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    if length < 3 {
        return (vec![0; length], vec![0]);
    }
    let mut x = Vec::with_capacity(length);
    let value = bracket_expression(length - 2, &EQUATION_IDS, rng, &mut x);
    let start = rng.index(x.len());
    let hole = (0..x.len())
        .map(|k| (start + k) % x.len())
        .find(|&i| x[i] < MODULUS)
        .expect("every expression holds a digit");
    let digit = x[hole];
    x[hole] = 9;
    x.push(10);
    x.push(value);
    (x, vec![digit])
}
