//! Tests of the CHE generators: every task's rule rechecked from its input by independent
//! decoders (a recursive-descent evaluator for the expressions, big-integer arithmetic for
//! the binary tasks) over lengths 1 to 500, known answers, coverage of the whole support at
//! small lengths, determinism by seed, names, levels and the generator's uniformity.

use super::context_sensitive::minimal_le_bits;
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
