use std::sync::Arc;

use super::*;
use crate::decode::constraint::SeqConstraint;
use crate::tokenizer::tests::demo_tokenizer;

const VOCAB: usize = 50432;

fn compiler() -> GrammarCompiler {
    GrammarCompiler::new(demo_tokenizer(), VOCAB, 0)
}

/// Feeds the tokens of `text` one by one; the index of the first one the mask refuses.
fn first_refused(seq: &mut SeqConstraint, text: &str) -> Option<usize> {
    let ids = demo_tokenizer().encode(text).expect("encode");
    for (i, &id) in ids.iter().enumerate() {
        if !seq.mask().expect("mask").allows(id) {
            return Some(i);
        }
        seq.consume(id).expect("consume");
    }
    None
}

#[test]
fn json_schema_allows_compact_valid_json_and_ends_there() {
    let c = compiler();
    let schema = r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}"#;
    let grammar = c
        .compile(&Constraint::JsonSchema(schema.into()))
        .expect("compiles");
    let mut seq = SeqConstraint::new(&grammar);
    let mask = seq.mask().expect("mask");
    assert!(!mask.allows(0), "EOS is not allowed before the value");
    assert!(
        (50277..VOCAB as u32).all(|id| !mask.allows(id)),
        "padding ids are never allowed"
    );
    assert_eq!(first_refused(&mut seq, r#"{"a":12}"#), None);
    assert!(seq.is_complete() || seq.mask().expect("mask").allows(0));
    let mut spaced = SeqConstraint::new(&grammar);
    assert!(
        first_refused(&mut spaced, r#"{ "a": 1}"#).is_some(),
        "no optional whitespace"
    );
    let mut wrong = SeqConstraint::new(&grammar);
    assert!(first_refused(&mut wrong, r#"{"b":1}"#).is_some());
}

#[test]
fn regex_and_choice_accept_exactly_their_language() {
    let c = compiler();
    let g = c
        .compile(&Constraint::Regex(r"[0-9]{3}-[a-z]+".into()))
        .expect("regex compiles");
    assert_eq!(first_refused(&mut SeqConstraint::new(&g), "123-abc"), None);
    assert!(first_refused(&mut SeqConstraint::new(&g), "12a").is_some());
    let g = c
        .compile(&Constraint::Choice(vec!["yes".into(), "no \"way\"".into()]))
        .expect("choice compiles");
    let mut seq = SeqConstraint::new(&g);
    assert_eq!(first_refused(&mut seq, "no \"way\""), None);
    assert!(seq.is_complete(), "nothing can follow a complete choice");
    assert!(first_refused(&mut SeqConstraint::new(&g), "maybe").is_some());
}

#[test]
fn forks_are_independent() {
    let c = compiler();
    let g = c
        .compile(&Constraint::Choice(vec!["left".into(), "right".into()]))
        .expect("compiles");
    let mut a = SeqConstraint::new(&g);
    let mut b = a.fork();
    assert_eq!(first_refused(&mut a, "left"), None);
    assert_eq!(first_refused(&mut b, "right"), None);
}

#[test]
fn compiled_grammars_are_cached_errors_too() {
    let c = compiler();
    let lark = Constraint::Lark("start: \"a\" | \"b\"\n".into());
    let one = c.compile(&lark).expect("compiles");
    let two = c.compile(&lark).expect("compiles");
    assert!(Arc::ptr_eq(&one, &two), "the second compile is a cache hit");
    let bad = Constraint::Regex("(unclosed".into());
    let e1 = c.compile(&bad).expect_err("bad regex");
    assert_eq!(c.compile(&bad).expect_err("cached"), e1);
}

#[test]
fn bad_and_hostile_grammars_are_errors() {
    let c = compiler();
    for bad in [
        Constraint::JsonSchema("{not json".into()),
        Constraint::JsonSchema("[1, 2]".into()),
        Constraint::JsonSchema(
            r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/missing"}}}"##.into(),
        ),
        Constraint::Lark("start: undefined_rule\n".into()),
        Constraint::Choice(vec![]),
    ] {
        assert!(c.compile(&bad).is_err(), "{bad:?} should not compile");
    }
    // A 3 MB enum: llguidance's lexer-size limit refuses it (in about a second) instead of
    // building it.
    let values: Vec<String> = (0..200_000)
        .map(|i| format!("\"v{i}x{}\"", i * 7919))
        .collect();
    let hostile = Constraint::JsonSchema(format!("{{\"enum\":[{}]}}", values.join(",")));
    let err = c.compile(&hostile).expect_err("too big");
    assert!(err.contains("too big"), "{err}");
}
