//! EM and F1 against SQuAD v1.1's official functions (`tests/oracle.py squad`), on answer pairs that
//! exercise case, punctuation, articles (also inside words and next to non-ASCII punctuation), repeated
//! tokens, unicode and empty answers.

mod common;

use ferrotune_trainer::eval::{exact_match, f1};

#[test]
fn em_and_f1_equal_the_squad_reference() {
    let pairs: Vec<(&str, &str)> = vec![
        ("Paris", "paris"),
        ("The capital of France is Paris.", "Paris"),
        ("a small bakery", "small bakery"),
        ("the the the", ""),
        ("", ""),
        ("in an old railway station", "an old railway station"),
        ("Theater", "the ater"),
        ("the’s thing", "’s thing"),
        ("on a red bicycle!!", "On a red bicycle"),
        ("two hundred", "two hundred clocks"),
        ("red red blue", "red blue blue"),
        ("Très bien, merci", "tres bien merci"),
        ("東京は日本の首都です。", "東京は日本の首都です"),
        ("U.S.A.", "USA"),
        ("4 hours, 10 minutes", "four hours and ten minutes"),
        ("  spaced \t out \n answer ", "spaced out answer"),
        ("Mr. Hale", "mr hale"),
        ("an_apple", "an apple"),
        ("A", "an"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("pairs.json"), tmp.path().join("out.json"));
    std::fs::write(&inp, serde_json::to_string(&pairs).unwrap()).unwrap();
    common::oracle(&["squad", inp.to_str().unwrap(), out.to_str().unwrap()]);
    let reference: Vec<(f64, f64)> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for ((p, g), (em, f)) in pairs.iter().zip(reference) {
        assert_eq!(exact_match(p, g), em, "EM of {p:?} vs {g:?}");
        assert!((f1(p, g) - f).abs() < 1e-12, "F1 of {p:?} vs {g:?}: {} vs {f}", f1(p, g));
    }
}
