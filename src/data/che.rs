//! The 15 CHE (Chomsky hierarchy) tasks of "Neural Networks and the Chomsky Hierarchy"
//! (Delétang et al., ICLR 2023) as exact, seeded, deterministic generators.
//!
//! A [`Task`] draws one [`Sample`] for a requested length `L` from a [`Rng`]: the input tokens
//! `x_1..x_L`, the target of [`Task::output_len`] tokens and a per-position mask. The model reads
//! `[x_1..x_L, e repeated output_len(L) times]` (the caller appends the placeholders `e`) and is
//! scored per position by `argmax(prediction) == target` on the positions whose mask is 1
//! ([`sequence_accuracy`]).
//!
//! The masked tasks (stack_manipulation, binary_addition, binary_multiplication) end their
//! answer with the terminator id 2 and pad it with zeros; only the positions up to and including
//! the first 2 count. Every other task counts all its output positions.
//!
//! Notation in the docs below: `U{a..b}` is uniform on `a..=b`.

use std::fmt;
use std::str::FromStr;

use num_bigint::BigUint;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The modulus of the arithmetic tasks.
const MODULUS: i64 = 5;

/// Terminator (and separator) id of the masked tasks.
const TERMINATOR: i64 = 2;

pub use crate::util::Rng;

/// The generators' helpers the tasks use.
impl Rng {
    /// A uniform index in `0..n` (`n > 0`).
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// A uniform integer in `lo..=hi` as a `usize`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        self.range_inclusive(lo as u64, hi as u64) as usize
    }

    /// A uniform token in `0..n`.
    fn token(&mut self, n: i64) -> i64 {
        self.below(n as u64) as i64
    }

    /// `count` uniform bits.
    fn bits(&mut self, count: usize) -> Vec<i64> {
        (0..count).map(|_| self.bit()).collect()
    }

    /// A uniform integer in `1..=2^bits - 1` (`bits > 0`): random bits, all-zero rejected.
    fn nonzero_biguint(&mut self, bits: usize) -> BigUint {
        loop {
            let n = biguint_from_le_bits(&self.bits(bits));
            if n.bits() > 0 {
                return n;
            }
        }
    }
}

/// One of the 15 CHE tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Regular: whether the number of changes between neighbouring bits is odd.
    EvenPairs,
    /// Regular: the value mod 5 of a flat expression over digits 0-4 with `+`, `-`, `*`.
    ModularArithmetic,
    /// Regular: the number of ones mod 2.
    ParityCheck,
    /// Regular: the final position on a cycle of 5 after steps -1, 0, +1.
    CycleNavigation,
    /// Deterministic context-free: the stack after a sequence of pushes and pops.
    StackManipulation,
    /// Deterministic context-free: the input reversed.
    ReverseString,
    /// Deterministic context-free: the value mod 5 of a bracketed expression.
    ModularArithmeticBrackets,
    /// Deterministic context-free: the digit hidden as `x` in a bracketed equation mod 5.
    SolveEquation,
    /// Context-sensitive: the input written twice.
    DuplicateString,
    /// Context-sensitive: the bit removed from a string written twice.
    MissingDuplicateString,
    /// Context-sensitive: the odd positions, then the even positions.
    OddsFirst,
    /// Context-sensitive: the sum of two little-endian binary numbers.
    BinaryAddition,
    /// Context-sensitive: the product of two little-endian binary numbers.
    BinaryMultiplication,
    /// Context-sensitive: the integer square root of a big-endian binary number.
    ComputeSqrt,
    /// Context-sensitive: the input tokens sorted.
    BucketSort,
}

impl Task {
    /// All tasks, regular first, then deterministic context-free, then context-sensitive.
    pub const ALL: [Task; 15] = [
        Task::EvenPairs,
        Task::ModularArithmetic,
        Task::ParityCheck,
        Task::CycleNavigation,
        Task::StackManipulation,
        Task::ReverseString,
        Task::ModularArithmeticBrackets,
        Task::SolveEquation,
        Task::DuplicateString,
        Task::MissingDuplicateString,
        Task::OddsFirst,
        Task::BinaryAddition,
        Task::BinaryMultiplication,
        Task::ComputeSqrt,
        Task::BucketSort,
    ];

    /// The task's snake_case name, e.g. `"even_pairs"`.
    pub fn name(&self) -> &'static str {
        match self {
            Task::EvenPairs => "even_pairs",
            Task::ModularArithmetic => "modular_arithmetic",
            Task::ParityCheck => "parity_check",
            Task::CycleNavigation => "cycle_navigation",
            Task::StackManipulation => "stack_manipulation",
            Task::ReverseString => "reverse_string",
            Task::ModularArithmeticBrackets => "modular_arithmetic_brackets",
            Task::SolveEquation => "solve_equation",
            Task::DuplicateString => "duplicate_string",
            Task::MissingDuplicateString => "missing_duplicate_string",
            Task::OddsFirst => "odds_first",
            Task::BinaryAddition => "binary_addition",
            Task::BinaryMultiplication => "binary_multiplication",
            Task::ComputeSqrt => "compute_sqrt",
            Task::BucketSort => "bucket_sort",
        }
    }

    /// The task named `name` (its snake_case [`Task::name`]).
    ///
    /// Unknown names give [`Error::InvalidConfig`] listing the known ones.
    pub fn from_name(name: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|task| task.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Task::ALL.iter().map(Task::name).collect();
                Error::invalid(
                    "task",
                    name,
                    format!("unknown CHE task; known tasks: {}", known.join(", ")),
                )
            })
    }

    /// The task's level in the Chomsky hierarchy: `"R"` (regular), `"DCF"` (deterministic
    /// context-free) or `"CS"` (context-sensitive).
    pub fn level(&self) -> &'static str {
        match self {
            Task::EvenPairs
            | Task::ModularArithmetic
            | Task::ParityCheck
            | Task::CycleNavigation => "R",
            Task::StackManipulation
            | Task::ReverseString
            | Task::ModularArithmeticBrackets
            | Task::SolveEquation => "DCF",
            Task::DuplicateString
            | Task::MissingDuplicateString
            | Task::OddsFirst
            | Task::BinaryAddition
            | Task::BinaryMultiplication
            | Task::ComputeSqrt
            | Task::BucketSort => "CS",
        }
    }

    /// The number of input token ids (every input id is below it).
    pub fn input_vocab(&self) -> usize {
        match self {
            Task::EvenPairs
            | Task::ParityCheck
            | Task::ReverseString
            | Task::DuplicateString
            | Task::OddsFirst
            | Task::ComputeSqrt => 2,
            Task::CycleNavigation | Task::BinaryAddition | Task::BinaryMultiplication => 3,
            Task::MissingDuplicateString => 4,
            Task::StackManipulation | Task::BucketSort => 5,
            Task::ModularArithmetic => 9,
            Task::ModularArithmeticBrackets | Task::SolveEquation => 11,
        }
    }

    /// The number of output classes (every target id is below it).
    pub fn output_vocab(&self) -> usize {
        match self {
            Task::EvenPairs
            | Task::ParityCheck
            | Task::ReverseString
            | Task::DuplicateString
            | Task::MissingDuplicateString
            | Task::OddsFirst
            | Task::ComputeSqrt => 2,
            Task::StackManipulation | Task::BinaryAddition | Task::BinaryMultiplication => 3,
            Task::ModularArithmetic
            | Task::CycleNavigation
            | Task::ModularArithmeticBrackets
            | Task::SolveEquation
            | Task::BucketSort => 5,
        }
    }

    /// The number of output positions for the input length `length`.
    pub fn output_len(&self, length: usize) -> usize {
        match self {
            Task::EvenPairs
            | Task::ModularArithmetic
            | Task::ParityCheck
            | Task::CycleNavigation
            | Task::ModularArithmeticBrackets
            | Task::SolveEquation
            | Task::MissingDuplicateString => 1,
            Task::StackManipulation | Task::BinaryAddition => length + 1,
            Task::ReverseString
            | Task::OddsFirst
            | Task::BinaryMultiplication
            | Task::BucketSort => length,
            Task::DuplicateString => 2 * length,
            Task::ComputeSqrt => length.div_ceil(2),
        }
    }

    /// Whether only the output positions up to and including the first terminator (id 2) count.
    pub fn is_masked(&self) -> bool {
        matches!(
            self,
            Task::StackManipulation | Task::BinaryAddition | Task::BinaryMultiplication
        )
    }

    /// Whether the task depends on token order, i.e. needs positional information; false only
    /// for the permutation-invariant parity_check, cycle_navigation and bucket_sort.
    pub fn needs_position(&self) -> bool {
        !matches!(
            self,
            Task::ParityCheck | Task::CycleNavigation | Task::BucketSort
        )
    }

    /// Draws one sample of input length `length` (at least 1) from `rng`.
    ///
    /// `input.len() == length` for every task except modular_arithmetic with an even `length`,
    /// whose input has the odd length `length - 1` (its expressions alternate digit, operator,
    /// ..., digit). `target.len() == mask.len() == self.output_len(length)`.
    pub fn sample(&self, length: usize, rng: &mut Rng) -> Result<Sample> {
        if length == 0 {
            return Err(Error::invalid("length", 0, "CHE lengths start at 1"));
        }
        let (input, target) = match self {
            Task::EvenPairs => even_pairs(length, rng),
            Task::ModularArithmetic => modular_arithmetic(length, rng),
            Task::ParityCheck => parity_check(length, rng),
            Task::CycleNavigation => cycle_navigation(length, rng),
            Task::StackManipulation => stack_manipulation(length, rng),
            Task::ReverseString => reverse_string(length, rng),
            Task::ModularArithmeticBrackets => modular_arithmetic_brackets(length, rng),
            Task::SolveEquation => solve_equation(length, rng),
            Task::DuplicateString => duplicate_string(length, rng),
            Task::MissingDuplicateString => missing_duplicate_string(length, rng),
            Task::OddsFirst => odds_first(length, rng),
            Task::BinaryAddition => binary_addition(length, rng),
            Task::BinaryMultiplication => binary_multiplication(length, rng),
            Task::ComputeSqrt => compute_sqrt(length, rng),
            Task::BucketSort => bucket_sort(length, rng),
        };
        debug_assert_eq!(target.len(), self.output_len(length), "{self}");
        let mask = if self.is_masked() {
            terminator_mask(&target)
        } else {
            vec![1; target.len()]
        };
        Ok(Sample {
            input,
            target,
            mask,
        })
    }

    /// `count` samples of input length `length`, drawn from a [`Rng`] seeded with `seed`: the
    /// same arguments always give the same samples.
    pub fn samples(&self, length: usize, count: usize, seed: u64) -> Result<Vec<Sample>> {
        let mut rng = Rng::new(seed);
        (0..count).map(|_| self.sample(length, &mut rng)).collect()
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Task::from_name(s)
    }
}

/// One generated example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The input token ids `x_1..x_L` (without the output placeholders). Its length is the
    /// requested length, except for modular_arithmetic with an even length (one less).
    pub input: Vec<i64>,
    /// The target id of every output position.
    pub target: Vec<i64>,
    /// 1 where the output position is scored, 0 where it is ignored; same length as `target`.
    pub mask: Vec<u8>,
}

/// The fraction of scored positions (mask 1) of `sample` where `predicted` equals the target.
///
/// `predicted` holds one id per output position; a scored position that `predicted` is too short
/// to cover counts as wrong. Every generated sample scores at least one position; a sample
/// without any gives 1.0.
pub fn sequence_accuracy(predicted: &[i64], sample: &Sample) -> f64 {
    let mut scored = 0usize;
    let mut correct = 0usize;
    for (i, (&target, &mask)) in sample.target.iter().zip(&sample.mask).enumerate() {
        if mask == 0 {
            continue;
        }
        scored += 1;
        if predicted.get(i) == Some(&target) {
            correct += 1;
        }
    }
    if scored == 0 {
        1.0
    } else {
        correct as f64 / scored as f64
    }
}

/// Ones up to and including the first terminator (id 2) of `target`, zeros after.
fn terminator_mask(target: &[i64]) -> Vec<u8> {
    let end = target
        .iter()
        .position(|&t| t == TERMINATOR)
        .map_or(target.len(), |p| p + 1);
    (0..target.len()).map(|i| u8::from(i < end)).collect()
}

/// even_pairs: `x ~ U{0,1}^L`; `y` = the number of `i` with `x_i != x_{i+1}`, mod 2.
fn even_pairs(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let changes = x.windows(2).filter(|w| w[0] != w[1]).count() as i64;
    (x, vec![changes % 2])
}

/// modular_arithmetic: with `L` made odd (`L - 1` when even), digits `U{0..4}` at even positions
/// and operators `U{+ 5, - 6, * 7}` at odd positions (id 8 unused); `y` = the value with `*`
/// before `+`/`-`, left-associative, mod 5.
fn modular_arithmetic(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn parity_check(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let ones: i64 = x.iter().sum();
    (x, vec![ones % 2])
}

/// cycle_navigation: `t ~ U{0,1,2}^L` (steps -1, 0, +1); `y = sum(t - 1) mod 5`.
fn cycle_navigation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let t: Vec<i64> = (0..length).map(|_| rng.token(3)).collect();
    let position: i64 = t.iter().map(|&s| s - 1).sum();
    (t, vec![position.rem_euclid(MODULUS)])
}

/// stack_manipulation: ids 0/1 symbols, 2 POP, 3 PUSH 0, 4 PUSH 1.
///
/// `L = 1`: input `[b]`, `b ~ U{0,1}`, output `[b, 2]`. Otherwise `s ~ U{1..L-1}`, the initial
/// stack `U{0,1}^s` (bottom to top), then `L - s` actions `U{2,3,4}`; a POP on the empty stack is
/// ignored. Output: the final stack top to bottom, 2, then zeros up to `L + 1`.
fn stack_manipulation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn reverse_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn modular_arithmetic_brackets(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let mut x = Vec::with_capacity(length);
    let value = bracket_expression(length, &ARITHMETIC_IDS, rng, &mut x);
    (x, vec![value])
}

/// solve_equation: ids 0-4 digits, 5 `+`, 6 `-`, 7 `(`, 8 `)`, 9 `x`, 10 `=`.
///
/// `L < 3`: all zeros, `y = 0`. Otherwise `e` = a bracketed expression of length `L - 2` with
/// only `+` and `-`; from a uniform index of `e`, the first digit at or cyclically after it is
/// replaced by `x`; input = `e = value(e) mod 5`; `y` = the replaced digit.
fn solve_equation(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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

/// duplicate_string: `x ~ U{0,1}^L`; `y = x ++ x`.
fn duplicate_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let y = [x.as_slice(), x.as_slice()].concat();
    (x, y)
}

/// missing_duplicate_string: ids 0/1, 2 hole, 3 pad.
///
/// `L = 1`: input `[1]`, `y = 1`. Otherwise `s ~ U{0,1}^{floor(L/2)}`, `d = s ++ s`,
/// `i ~ U{0..len(d)-1}`, `y = d_i`, `d_i := 2`, and a 3 is appended when `L` is odd.
fn missing_duplicate_string(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn odds_first(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x = rng.bits(length);
    let odds = x.iter().skip(1).step_by(2);
    let evens = x.iter().step_by(2);
    let y = odds.chain(evens).copied().collect();
    (x, y)
}

/// The `BigUint` of little-endian bits.
fn biguint_from_le_bits(bits: &[i64]) -> BigUint {
    let mut n = BigUint::default();
    for (i, &b) in bits.iter().enumerate() {
        if b != 0 {
            n.set_bit(i as u64, true);
        }
    }
    n
}

/// The little-endian bits of `n` without trailing zeros; zero is `[0]`.
fn minimal_le_bits(n: &BigUint) -> Vec<i64> {
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
fn binary_addition(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn binary_multiplication(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn compute_sqrt(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
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
fn bucket_sort(length: usize, rng: &mut Rng) -> (Vec<i64>, Vec<i64>) {
    let x: Vec<i64> = (0..length).map(|_| rng.token(5)).collect();
    let mut y = x.clone();
    y.sort_unstable();
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The lengths every task is checked on, with how many samples each.
    fn lengths() -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = (1..=40).map(|l| (l, 200)).collect();
        out.extend([41, 47, 64, 77, 100, 128, 150, 199, 200].map(|l| (l, 30)));
        out.push((500, 10));
        out
    }

    /// Little-endian bits to a number (independent of the generator's helpers).
    fn decode_le(bits: &[i64]) -> BigUint {
        bits.iter().rev().fold(BigUint::default(), |acc, &b| {
            assert!(b == 0 || b == 1, "not a bit: {b}");
            acc * 2u32 + b as u32
        })
    }

    /// Big-endian bits to a number.
    fn decode_be(bits: &[i64]) -> BigUint {
        let mut le = bits.to_vec();
        le.reverse();
        decode_le(&le)
    }

    /// A recursive-descent evaluator (mod 5) of expressions over digits 0-4, binary `+ - *` with
    /// `*` binding tighter, unary minus and brackets; `x` (if given) stands for a digit.
    struct Parser<'a> {
        tokens: &'a [i64],
        pos: usize,
        ids: (i64, i64, Option<i64>, Option<(i64, i64)>),
        x: Option<(i64, i64)>,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<i64> {
            self.tokens.get(self.pos).copied()
        }

        fn expr(&mut self) -> i64 {
            let mut value = self.term();
            loop {
                let t = self.peek();
                if t == Some(self.ids.0) {
                    self.pos += 1;
                    value += self.term();
                } else if t == Some(self.ids.1) {
                    self.pos += 1;
                    value -= self.term();
                } else {
                    return value.rem_euclid(5);
                }
            }
        }

        fn term(&mut self) -> i64 {
            let mut value = self.unary();
            while self.ids.2.is_some() && self.peek() == self.ids.2 {
                self.pos += 1;
                value = (value * self.unary()).rem_euclid(5);
            }
            value
        }

        fn unary(&mut self) -> i64 {
            let t = self.peek().expect("unexpected end of expression");
            self.pos += 1;
            if t == self.ids.1 {
                return (-self.unary()).rem_euclid(5);
            }
            if let Some((open, close)) = self.ids.3 {
                if t == open {
                    let value = self.expr();
                    assert_eq!(self.peek(), Some(close), "unbalanced brackets");
                    self.pos += 1;
                    return value;
                }
            }
            if let Some((x_id, x_value)) = self.x {
                if t == x_id {
                    return x_value;
                }
            }
            assert!((0..5).contains(&t), "expected a digit, got {t}");
            t
        }
    }

    fn evaluate(
        tokens: &[i64],
        ids: (i64, i64, Option<i64>, Option<(i64, i64)>),
        x: Option<(i64, i64)>,
    ) -> i64 {
        let mut parser = Parser {
            tokens,
            pos: 0,
            ids,
            x,
        };
        let value = parser.expr();
        assert_eq!(parser.pos, tokens.len(), "trailing tokens in {tokens:?}");
        value
    }

    /// Checks the answer of `task` on `sample` by recomputing the rule from the input.
    fn check_rule(task: Task, length: usize, s: &Sample) {
        let x = &s.input;
        let y = &s.target;
        match task {
            Task::EvenPairs => {
                let changes = (1..length).filter(|&i| x[i] != x[i - 1]).count();
                assert_eq!(y[0], (changes % 2) as i64);
                // Equivalent: the first and last bits differ.
                assert_eq!(y[0], i64::from(x[0] != x[length - 1]));
            }
            Task::ModularArithmetic => {
                let expected_len = if length.is_multiple_of(2) {
                    length - 1
                } else {
                    length
                };
                assert_eq!(x.len(), expected_len);
                for (i, &t) in x.iter().enumerate() {
                    if i % 2 == 0 {
                        assert!((0..5).contains(&t));
                    } else {
                        assert!((5..8).contains(&t));
                    }
                }
                assert_eq!(y[0], evaluate(x, (5, 6, Some(7), None), None));
            }
            Task::ParityCheck => {
                assert_eq!(y[0], x.iter().filter(|&&b| b == 1).count() as i64 % 2);
            }
            Task::CycleNavigation => {
                let mut position = 0i64;
                for &t in x {
                    position = (position + 5 + t - 1) % 5;
                }
                assert_eq!(y[0], position);
            }
            Task::StackManipulation => {
                if length == 1 {
                    assert_eq!(y, &vec![x[0], 2]);
                    return;
                }
                let split = x.iter().position(|&t| t >= 2).unwrap_or(length);
                assert!((1..length).contains(&split), "initial stack size {split}");
                assert!(x[split..].iter().all(|&t| (2..5).contains(&t)));
                let mut stack: Vec<i64> = x[..split].to_vec();
                for &action in &x[split..] {
                    match action {
                        2 => {
                            let _ = stack.pop();
                        }
                        3 => stack.push(0),
                        4 => stack.push(1),
                        _ => unreachable!(),
                    }
                }
                let mut expected = vec![0; length + 1];
                for (k, &v) in stack.iter().rev().enumerate() {
                    expected[k] = v;
                }
                expected[stack.len()] = 2;
                assert_eq!(y, &expected);
            }
            Task::ReverseString => {
                for i in 0..length {
                    assert_eq!(y[i], x[length - 1 - i]);
                }
            }
            Task::ModularArithmeticBrackets => {
                assert_eq!(y[0], evaluate(x, (5, 6, Some(7), Some((8, 9))), None));
            }
            Task::SolveEquation => {
                if length < 3 {
                    assert!(x.iter().all(|&t| t == 0));
                    assert_eq!(y[0], 0);
                    return;
                }
                assert_eq!(x[length - 2], 10);
                assert_eq!(x.iter().filter(|&&t| t == 9).count(), 1);
                assert_eq!(x.iter().filter(|&&t| t == 10).count(), 1);
                let rhs = x[length - 1];
                assert!((0..5).contains(&rhs));
                let lhs = &x[..length - 2];
                assert!(lhs.iter().all(|&t| (0..10).contains(&t)));
                assert_eq!(
                    evaluate(lhs, (5, 6, None, Some((7, 8))), Some((9, y[0]))),
                    rhs
                );
            }
            Task::DuplicateString => {
                assert_eq!(&y[..length], x.as_slice());
                assert_eq!(&y[length..], x.as_slice());
            }
            Task::MissingDuplicateString => {
                if length == 1 {
                    assert_eq!((x.as_slice(), y[0]), (&[1][..], 1));
                    return;
                }
                let half = length / 2;
                assert_eq!(length % 2 == 1, x.last() == Some(&3));
                if length % 2 == 1 {
                    assert!(!x[..length - 1].contains(&3));
                }
                let d = &x[..2 * half];
                let hole = d.iter().position(|&t| t == 2).expect("a hole");
                assert_eq!(d.iter().filter(|&&t| t == 2).count(), 1);
                let twin = (hole + half) % (2 * half);
                assert_eq!(y[0], d[twin]);
                for j in 0..half {
                    if j != hole % half {
                        assert_eq!(d[j], d[j + half]);
                    }
                }
            }
            Task::OddsFirst => {
                let odds = length / 2;
                for k in 0..odds {
                    assert_eq!(y[k], x[2 * k + 1]);
                }
                for k in 0..length - odds {
                    assert_eq!(y[odds + k], x[2 * k]);
                }
            }
            Task::BinaryAddition | Task::BinaryMultiplication => {
                let add = task == Task::BinaryAddition;
                let end = y.iter().position(|&t| t == 2).expect("a terminator");
                assert!(y[end + 1..].iter().all(|&t| t == 0));
                let result = &y[..end];
                assert!(result.iter().all(|&t| t < 2));
                // Only multiplication's one-token output at L = 1 has no bits before the 2.
                assert!(!result.is_empty() || (!add && length == 1));
                if length <= 2 {
                    assert!(x.iter().all(|&t| t < 2));
                    let n = decode_le(x);
                    assert!(n < BigUint::from((1u32 << length) - 1));
                    if add {
                        assert_eq!(decode_le(result), n);
                        assert!(result.len() == 1 || result.last() == Some(&1));
                    } else {
                        assert_eq!(y, &[vec![0; length - 1], vec![2]].concat());
                    }
                    return;
                }
                let sep = x.iter().position(|&t| t == 2).expect("a separator");
                assert_eq!(x.iter().filter(|&&t| t == 2).count(), 1);
                assert!(sep >= 1 && sep <= length - 2);
                let n = decode_le(&x[..sep]);
                let m = decode_le(&x[sep + 1..]);
                assert!(n.bits() > 0 && m.bits() > 0);
                let expected = if add { &n + &m } else { &n * &m };
                assert_eq!(decode_le(result), expected);
                // No trailing zeros (the result is never zero here).
                assert_eq!(result.last(), Some(&1));
                if length <= 40 {
                    // Fully independent check with machine integers.
                    let small = |bits: &[i64]| {
                        bits.iter()
                            .enumerate()
                            .map(|(i, &b)| (b as u128) << i)
                            .sum::<u128>()
                    };
                    let (n, m) = (small(&x[..sep]), small(&x[sep + 1..]));
                    let expected = if add { n + m } else { n * m };
                    assert_eq!(small(result), expected);
                }
            }
            Task::ComputeSqrt => {
                let n = decode_be(x);
                let r = decode_be(y);
                assert!(n.bits() > 0, "n must be positive");
                assert!(&r * &r <= n);
                let r1 = &r + 1u32;
                assert!(&r1 * &r1 > n);
            }
            Task::BucketSort => {
                assert!(y.windows(2).all(|w| w[0] <= w[1]));
                let mut counts = [0usize; 5];
                for &t in x {
                    counts[t as usize] += 1;
                }
                for &t in y {
                    counts[t as usize] -= 1;
                }
                assert_eq!(counts, [0; 5]);
            }
        }
    }

    fn check_sample(task: Task, length: usize, s: &Sample) {
        let out_len = task.output_len(length);
        assert_eq!(s.target.len(), out_len, "{task} L={length}");
        assert_eq!(s.mask.len(), out_len, "{task} L={length}");
        if task != Task::ModularArithmetic {
            assert_eq!(s.input.len(), length, "{task} L={length}");
        }
        for &t in &s.input {
            assert!(
                t >= 0 && (t as usize) < task.input_vocab(),
                "{task}: input {t}"
            );
        }
        for &t in &s.target {
            assert!(
                t >= 0 && (t as usize) < task.output_vocab(),
                "{task}: target {t}"
            );
        }
        if task.is_masked() {
            let first = s.target.iter().position(|&t| t == 2).expect("terminator");
            for (i, &m) in s.mask.iter().enumerate() {
                assert_eq!(m, u8::from(i <= first), "{task} L={length} mask {i}");
            }
        } else {
            assert!(s.mask.iter().all(|&m| m == 1));
        }
        assert!(s.mask.contains(&1));
        assert_eq!(sequence_accuracy(&s.target, s), 1.0);
        check_rule(task, length, s);
    }

    #[test]
    fn every_task_follows_its_rule() {
        for task in Task::ALL {
            for (length, count) in lengths() {
                let seed = 1000 * length as u64 + task as u64;
                for s in task.samples(length, count, seed).unwrap() {
                    check_sample(task, length, &s);
                }
            }
        }
    }

    #[test]
    fn modular_arithmetic_is_right_at_every_length_in_one_stream() {
        // The same generator serves many lengths in a row (the original code broke here).
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            for length in 1..=30 {
                let s = Task::ModularArithmetic.sample(length, &mut rng).unwrap();
                check_sample(Task::ModularArithmetic, length, &s);
            }
        }
    }

    #[test]
    fn known_answers() {
        // 3 + 4 * 2 - 1 = 10 = 0 mod 5 (precedence), while left-to-right would give 13 = 3.
        let tokens = [3, 5, 4, 7, 2, 6, 1];
        assert_eq!(evaluate(&tokens, (5, 6, Some(7), None), None), 0);
        // (-(2) * (3 - 4)) = 2
        let tokens = [8, 6, 2, 7, 8, 3, 6, 4, 9, 9];
        assert_eq!(evaluate(&tokens, (5, 6, Some(7), Some((8, 9))), None), 2);
        let s = Sample {
            input: vec![],
            target: vec![1, 0, 2, 0],
            mask: terminator_mask(&[1, 0, 2, 0]),
        };
        assert_eq!(s.mask, vec![1, 1, 1, 0]);
        assert_eq!(sequence_accuracy(&[1, 1, 2, 1], &s), 2.0 / 3.0);
        assert_eq!(sequence_accuracy(&[1], &s), 1.0 / 3.0);
        assert_eq!(minimal_le_bits(&BigUint::from(0u32)), vec![0]);
        assert_eq!(minimal_le_bits(&BigUint::from(6u32)), vec![0, 1, 1]);
    }

    /// Counts the distinct inputs over many samples.
    fn distinct_inputs(task: Task, length: usize) -> usize {
        let samples = task.samples(length, 5000, 99).unwrap();
        samples
            .into_iter()
            .map(|s| s.input)
            .collect::<HashSet<_>>()
            .len()
    }

    #[test]
    fn small_lengths_cover_the_whole_support() {
        assert_eq!(distinct_inputs(Task::EvenPairs, 4), 16);
        assert_eq!(distinct_inputs(Task::CycleNavigation, 3), 27);
        assert_eq!(distinct_inputs(Task::ModularArithmetic, 3), 75);
        assert_eq!(distinct_inputs(Task::ModularArithmetic, 4), 75);
        assert_eq!(distinct_inputs(Task::ModularArithmeticBrackets, 5), 75);
        // L = 6: a in {1, 2}: (d op -d) and (-d op d), 2 * 5 * 3 * 5.
        assert_eq!(distinct_inputs(Task::ModularArithmeticBrackets, 6), 150);
        // s = 1: 2 * 3^2 inputs; s = 2: 4 * 3 inputs.
        assert_eq!(distinct_inputs(Task::StackManipulation, 3), 30);
        // 4 strings s, 4 hole positions.
        assert_eq!(distinct_inputs(Task::MissingDuplicateString, 4), 16);
        assert_eq!(distinct_inputs(Task::MissingDuplicateString, 5), 16);
        // a = 1: n = 1, m in 1..=3; a = 2: n in 1..=3, m = 1.
        assert_eq!(distinct_inputs(Task::BinaryAddition, 4), 6);
        assert_eq!(distinct_inputs(Task::BinaryAddition, 2), 3);
        assert_eq!(distinct_inputs(Task::BinaryMultiplication, 1), 1);
        assert_eq!(distinct_inputs(Task::ComputeSqrt, 3), 7);
        // "d = v" with x replacing d: the input is [9, 10, v].
        assert_eq!(distinct_inputs(Task::SolveEquation, 3), 5);
        assert_eq!(distinct_inputs(Task::BucketSort, 2), 25);
    }

    #[test]
    fn samples_are_deterministic_by_seed() {
        for task in Task::ALL {
            let a = task.samples(20, 10, 42).unwrap();
            let b = task.samples(20, 10, 42).unwrap();
            let c = task.samples(20, 10, 43).unwrap();
            assert_eq!(a, b, "{task}");
            assert_ne!(a, c, "{task}");
        }
    }

    #[test]
    fn names_round_trip() {
        let mut names = HashSet::new();
        for task in Task::ALL {
            assert_eq!(Task::from_name(task.name()).unwrap(), task);
            assert_eq!(task.to_string().parse::<Task>().unwrap(), task);
            let json = serde_json::to_string(&task).unwrap();
            assert_eq!(json, format!("\"{}\"", task.name()));
            assert_eq!(serde_json::from_str::<Task>(&json).unwrap(), task);
            assert!(names.insert(task.name()));
            assert!(["R", "DCF", "CS"].contains(&task.level()));
        }
        assert_eq!(names.len(), 15);
        let err = Task::from_name("sort_buckets").unwrap_err();
        match &err {
            Error::InvalidConfig { field, value, .. } => {
                assert_eq!(field, "task");
                assert_eq!(value, "sort_buckets");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("bucket_sort"));
        assert!("".parse::<Task>().is_err());
    }

    #[test]
    fn length_zero_is_an_error() {
        for task in Task::ALL {
            let err = task.sample(0, &mut Rng::new(0)).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { ref field, .. } if field == "length"));
            assert!(task.samples(0, 3, 0).is_err());
        }
    }

    #[test]
    fn position_and_levels() {
        let unordered: Vec<Task> = Task::ALL
            .into_iter()
            .filter(|t| !t.needs_position())
            .collect();
        assert_eq!(
            unordered,
            vec![Task::ParityCheck, Task::CycleNavigation, Task::BucketSort]
        );
        let count = |level| Task::ALL.iter().filter(|t| t.level() == level).count();
        assert_eq!((count("R"), count("DCF"), count("CS")), (4, 4, 7));
    }

    #[test]
    fn rng_is_uniform_and_in_range() {
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[rng.below(3) as usize] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
        for _ in 0..1000 {
            let v = rng.range_inclusive(5, 9);
            assert!((5..=9).contains(&v));
            assert!((0..2).contains(&rng.bit()));
        }
        assert_eq!(rng.range_inclusive(4, 4), 4);
        let _ = rng.range_inclusive(0, u64::MAX);
        let ones: i64 = (0..10_000).map(|_| rng.bit()).sum();
        assert!((4_700..5_300).contains(&ones), "{ones}");
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::new(5).next_u64(), Rng::new(6).next_u64());
    }
}
