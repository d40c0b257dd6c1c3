//! The generators' promises, checked from the items they produce.

use super::mqar::{MqarConfig, FILLER as MQAR_FILLER, KEY_BASE, MAX_KEYS, VALUE_BASE};
use super::passkey::{self, min_length, needle, PasskeyConfig, QUESTION};
use super::*;
use crate::util::Rng;

fn text(tokens: &[u16]) -> String {
    tokens.iter().map(|&t| char::from(t as u8)).collect()
}

fn is_key(t: u16) -> bool {
    (KEY_BASE..KEY_BASE + MAX_KEYS as u16).contains(&t)
}

#[test]
fn every_mqar_query_has_one_earlier_pair_and_the_stated_gap() {
    let config = MqarConfig::default();
    for seed in 0..50 {
        let mut rng = Rng::new(seed);
        for (length, pairs) in [(127, 8), (128, 1), (128, 32), (1000, 16), (4096, 62)] {
            let pairs = pairs.min((length + 1) / 4);
            let item = config.item(length, pairs, &mut rng).unwrap();
            let t = &item.tokens;
            assert_eq!(t.len(), length + 1, "a window is length + 1 tokens");
            assert_eq!(
                item.answer_targets.len(),
                pairs,
                "every key is queried once"
            );
            // The pairs: distinct keys, each followed by a value.
            let keys: Vec<u16> = (0..pairs).map(|i| t[2 * i]).collect();
            let mut distinct = keys.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), pairs, "keys are distinct");
            for i in 0..pairs {
                assert!(is_key(t[2 * i]) && t[2 * i + 1] >= VALUE_BASE);
            }
            let mut queried = Vec::new();
            for (&q, &gap) in item.answer_targets.iter().zip(&item.gaps) {
                assert!(q >= 2 * pairs, "a query comes after the pairs");
                let key = t[q];
                let pair = keys.iter().position(|&k| k == key).expect("query of a key");
                // The key occurs exactly once before its query, in the pair section.
                let earlier = t[..q].iter().filter(|&&x| x == key).count();
                assert_eq!(earlier, 1, "the key occurs once before its query");
                assert_eq!(t[q + 1], t[2 * pair + 1], "the answer is the pair's value");
                assert_eq!(gap, q - 2 * pair, "the gap is the stated distance");
                queried.push(pair);
            }
            queried.sort_unstable();
            assert_eq!(queried, (0..pairs).collect::<Vec<_>>());
            // Everything else is filler.
            let used = 2 * pairs + 2 * pairs;
            assert_eq!(t.iter().filter(|&&x| x != MQAR_FILLER).count(), used);
            let mask = item.answer_mask();
            assert_eq!(mask.iter().filter(|&&m| m).count(), pairs);
        }
    }
}

#[test]
fn mqar_query_slots_reach_the_end_of_long_windows() {
    // Placement is uniform, so over many long items some gap exceeds the training length.
    let config = MqarConfig::default();
    let mut rng = Rng::new(7);
    let longest = (0..20)
        .map(|_| config.item(2048, 16, &mut rng).unwrap())
        .flat_map(|item| item.gaps)
        .max()
        .unwrap();
    assert!(longest > 1024, "longest gap {longest}");
}

#[test]
fn passkey_occurs_once_at_the_stated_depth() {
    for seed in 0..20 {
        for length in [min_length(5), 128, 300, 1024] {
            for step in 0..=10 {
                let depth = f64::from(step) / 10.0;
                let p = passkey::item(length, depth, 5, &mut Rng::new(seed)).unwrap();
                let t = &p.item.tokens;
                assert_eq!(t.len(), length + 1);
                let s = text(t);
                let n = needle(&p.key);
                assert_eq!(s.matches(n.as_str()).count(), 1, "one needle in {s}");
                assert_eq!(s.find(n.as_str()), Some(p.needle_start));
                // The depth is the needle's offset into the filler, within half a byte.
                if p.filler > 0 {
                    assert!((p.depth - depth).abs() <= 0.5 / p.filler as f64 + 1e-12);
                    assert_eq!(p.needle_start as f64 / p.filler as f64, p.depth);
                }
                // The prompt ends with the question, the window with the answer.
                assert!(s.ends_with(&format!("{QUESTION}{}", p.key)));
                assert_eq!(p.key.len(), 5);
                assert!(!p.key.starts_with('0'));
                // The key's digits are the only digits besides its own two in the needle.
                let digits = s.chars().filter(char::is_ascii_digit).count();
                assert_eq!(digits, 3 * 5);
                // The scored targets predict exactly the answer's digits.
                let answer: String = p
                    .item
                    .answer_targets
                    .iter()
                    .map(|&target| char::from(t[target + 1] as u8))
                    .collect();
                assert_eq!(answer, p.key);
            }
        }
    }
}

#[test]
fn seeds_reproduce_and_differ() {
    let mqar = MqarConfig::default();
    let a = mqar.item(512, 16, &mut Rng::new(3)).unwrap();
    assert_eq!(a, mqar.item(512, 16, &mut Rng::new(3)).unwrap());
    assert_ne!(a, mqar.item(512, 16, &mut Rng::new(4)).unwrap());
    let p = passkey::item(512, 0.5, 5, &mut Rng::new(3)).unwrap();
    assert_eq!(p, passkey::item(512, 0.5, 5, &mut Rng::new(3)).unwrap());
    assert_ne!(
        p.key,
        passkey::item(512, 0.5, 5, &mut Rng::new(4)).unwrap().key
    );
    let train = PasskeyConfig::default();
    assert_eq!(
        train.train_item(128, &mut Rng::new(9)).unwrap(),
        train.train_item(128, &mut Rng::new(9)).unwrap()
    );
}

#[test]
fn bad_settings_are_named_errors() {
    fn err<T>(r: crate::Result<T>) -> String {
        r.err().expect("an error").to_string()
    }
    let mut rng = Rng::new(0);
    let e = err(passkey::item(512, 1.5, 5, &mut rng));
    assert!(e.contains("depth") && e.contains("1.5"), "{e}");
    let e = err(passkey::item(512, -0.1, 5, &mut rng));
    assert!(e.contains("depth"), "{e}");
    let e = err(passkey::item(50, 0.5, 5, &mut rng));
    assert!(e.contains("too short") && e.contains("50"), "{e}");
    let e = err(passkey::item(512, 0.5, 0, &mut rng));
    assert!(e.contains("digits") && e.contains('0'), "{e}");
    let e = err(PasskeyConfig {
        fraction: 0.0,
        digits: 5,
    }
    .validate(128));
    assert!(e.contains("fraction"), "{e}");
    let mqar = MqarConfig::default();
    let e = err(mqar.item(4096, MAX_KEYS + 1, &mut rng));
    assert!(e.contains("more than") && e.contains("63"), "{e}");
    let e = err(mqar.item(64, 17, &mut rng));
    assert!(e.contains("do not fit"), "{e}");
    let e = err(MqarConfig {
        keys: 0,
        ..MqarConfig::default()
    }
    .validate(128));
    assert!(e.contains("mqar.keys"), "{e}");
    assert!(RetrievalTask::from_name("needle").is_err());
}
