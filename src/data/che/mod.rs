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
//!
//! The generators live by level in the hierarchy, one file each: `regular.rs` (R),
//! `context_free.rs` (deterministic context-free, DCF) and `context_sensitive.rs` (CS). This
//! file holds the task list, the sampling and scoring they share, and the random helpers they
//! draw with; `tests.rs` rechecks every task's rule from its input.

mod context_free;
mod context_sensitive;
mod regular;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use num_bigint::BigUint;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use context_free::{
    modular_arithmetic_brackets, reverse_string, solve_equation, stack_manipulation,
};
use context_sensitive::{
    binary_addition, binary_multiplication, bucket_sort, compute_sqrt, duplicate_string,
    missing_duplicate_string, odds_first,
};
use regular::{cycle_navigation, even_pairs, modular_arithmetic, parity_check};

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
