use super::*;
use mpt_engine::decode::constraint::SeqConstraint;
use mpt_engine::decode::grammar::GrammarCompiler;
use mpt_engine::{Constraint, Tokenizer};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                           "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

fn plan(choice: Value, parallel: Option<bool>) -> ToolPlan {
    tool_plan(Some(&tools()), Some(&choice), parallel)
        .expect("valid")
        .expect("a plan")
}

/// Whether `text` is accepted token by token, and whether the grammar is then complete.
fn accepts(lark: &str, text: &str) -> (bool, bool) {
    let tok = Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).expect("tokenizer");
    let compiler = GrammarCompiler::new(tok.clone(), 50432, 0);
    let grammar = compiler
        .compile(&Constraint::Lark(lark.to_string()))
        .unwrap_or_else(|e| panic!("{e}\n{lark}"));
    let mut seq = SeqConstraint::new(&grammar);
    for id in tok.encode(text).expect("encode") {
        if seq.is_complete() || !seq.mask().expect("mask").allows(id) {
            return (false, false);
        }
        seq.consume(id).expect("consume");
    }
    let complete = seq.is_complete() || seq.mask().expect("mask").allows(0);
    (true, complete)
}

#[test]
fn required_forces_a_valid_call_of_any_tool() {
    let lark = plan(json!("required"), None).grammar(None);
    let call = "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}\n</tool_call>";
    assert_eq!(accepts(&lark, call), (true, true));
    let two = format!(
        "{call}\n<tool_call>\n{{\"name\":\"get_weather\",\"arguments\":{{\"city\":\"Oslo\"}}}}\n</tool_call>"
    );
    assert_eq!(accepts(&lark, &two), (true, true), "parallel calls");
    assert!(!accepts(&lark, "Hello").0, "no text answer");
    assert!(
        !accepts(
            &lark,
            "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":\"x\""
        )
        .0,
        "arguments follow the schema"
    );
    assert!(!accepts(&lark, "<tool_call>\n{\"name\":\"nope\"").0);
}

#[test]
fn named_function_is_the_only_call_and_only_once() {
    let lark = plan(
        json!({"type": "function", "function": {"name": "get_weather"}}),
        None,
    )
    .grammar(None);
    let call =
        "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rome\"}}\n</tool_call>";
    assert_eq!(accepts(&lark, call), (true, true));
    assert!(!accepts(&lark, &format!("{call}\n<tool_call>")).0);
    assert!(!accepts(&lark, "<tool_call>\n{\"name\":\"add\"").0);
}

#[test]
fn auto_allows_text_without_a_call_or_a_valid_call() {
    let p = plan(json!("auto"), Some(false));
    let lark = p.grammar(None);
    assert_eq!(accepts(&lark, "It is sunny."), (true, true));
    assert!(
        !accepts(&lark, "Sure. <tool_call>\n").0,
        "no call inside text"
    );
    let call = "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}\n</tool_call>";
    assert_eq!(accepts(&lark, call), (true, true));
    assert!(
        !accepts(&lark, &format!("{call}\n<tool_call>")).0,
        "parallel off"
    );
    let with_format = p.grammar(Some(&OutputSpec::Json(json!({"type": "object"}))));
    assert!(!accepts(&with_format, "plain").0);
    assert_eq!(accepts(&with_format, "{\"k\":1}"), (true, true));
}

#[test]
fn bad_tools_name_the_field() {
    let param = |tools: Value, choice: Value| {
        tool_plan(Some(&tools), Some(&choice), None)
            .expect_err("rejected")
            .body()
            .error
            .param
            .unwrap_or_default()
    };
    assert_eq!(
        param(json!([{"type": "retrieval"}]), json!("auto")),
        "tools[0].type"
    );
    assert_eq!(
        param(
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!("auto")
        ),
        "tools[0].function.name"
    );
    assert_eq!(
        param(
            tools(),
            json!({"type": "function", "function": {"name": "missing"}})
        ),
        "tool_choice"
    );
    assert_eq!(param(json!([]), json!("required")), "tool_choice");
    assert_eq!(
        tool_plan(Some(&tools()), Some(&json!("none")), None),
        Ok(None)
    );
    assert_eq!(tool_plan(None, None, None), Ok(None));
}
