//! JSON schemas, for the OpenAPI document, of the wire fields whose Rust type does not say what
//! they accept: fields kept as `serde_json::Value` (their shape varies) and strings with a fixed
//! set of values.
//!
//! Invariants: each schema accepts what validation (`validation.rs`, `structured.rs`,
//! `tools.rs`, `messages.rs`) accepts, as far as JSON Schema can say it: rules that tie two
//! fields together (exactly one of `structured_outputs`' keys, a `tool` message's
//! `tool_call_id`) are in descriptions; an object whose unknown keys validation refuses says
//! `additionalProperties: false`, one whose unknown keys are ignored does not.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema,
    SchemaType, Type,
};

use crate::openai::validation::MAX_STOP_STRINGS;

/// A function or schema name as OpenAI accepts it (`structured::valid_name`).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

fn of(builder: ObjectBuilder) -> Schema {
    Schema::Object(builder.build())
}

fn typed(kind: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(kind)
}

fn null() -> Schema {
    of(typed(Type::Null))
}

fn non_empty_string() -> ObjectBuilder {
    typed(Type::String).min_length(Some(1))
}

/// Exactly these strings.
fn one_of_strings(values: &[&str]) -> ObjectBuilder {
    typed(Type::String).enum_values(Some(values.iter().copied()))
}

fn array(items: Schema) -> ArrayBuilder {
    ArrayBuilder::new().items(RefOr::T(items))
}

/// `schema`, or `null` (which validation treats as absent).
fn or_null(schema: Schema, description: &str) -> Schema {
    let mut one_of = match schema {
        Schema::OneOf(one_of) => one_of,
        other => OneOfBuilder::new().item(other).build(),
    };
    one_of.items.push(RefOr::T(null()));
    one_of.description = Some(description.to_string());
    Schema::OneOf(one_of)
}

fn object(properties: &[(&str, Schema)], required: &[&str], closed: bool) -> ObjectBuilder {
    let mut b = typed(Type::Object);
    for (name, schema) in properties {
        b = b.property(*name, schema.clone());
    }
    for name in required {
        b = b.required(*name);
    }
    if closed {
        b = b.additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
    }
    b
}

/// Any JSON value.
pub fn any(description: &str) -> Schema {
    of(ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .description(Some(description)))
}

/// A JSON schema: an object, `true`, or (vLLM) a string holding one (`structured::schema`).
fn json_schema(description: &str) -> Schema {
    Schema::OneOf(
        OneOfBuilder::new()
            .item(of(typed(Type::Object)))
            .item(of(typed(Type::Boolean).enum_values(Some([true]))))
            .item(of(
                typed(Type::String).content_media_type("application/json")
            ))
            .description(Some(description))
            .build(),
    )
}

/// `prompt`: text, texts, token ids or lists of token ids; nothing empty.
pub fn prompt() -> Schema {
    let id = of(typed(Type::Integer)
        .minimum(Some(0))
        .description(Some("a token id, below the vocabulary size")));
    let ids = || array(id.clone()).min_items(Some(1));
    Schema::OneOf(
        OneOfBuilder::new()
            .item(of(non_empty_string()))
            .item(array(of(non_empty_string())).min_items(Some(1)))
            .item(ids())
            .item(array(ids().into()).min_items(Some(1)))
            .description(Some(
                "A string, a list of strings (one prompt each), a list of token ids, or a list of \
                 lists of token ids; several prompts give choices indexed prompt-major.",
            ))
            .build(),
    )
}

/// A field that is refused unless absent or `null`.
pub fn always_null() -> Schema {
    of(typed(Type::Null).description(Some("Not supported: only null is accepted.")))
}

/// `stop`: one non-empty string or up to four.
pub fn stop() -> Schema {
    let strings = array(of(non_empty_string())).max_items(Some(MAX_STOP_STRINGS));
    let either = Schema::OneOf(
        OneOfBuilder::new()
            .item(of(non_empty_string()))
            .item(strings)
            .build(),
    );
    or_null(either, "Stop strings: generation ends before any of them.")
}

/// `logit_bias`: token id → bias in [-100, 100].
pub fn logit_bias() -> Schema {
    let bias = typed(Type::Number).minimum(Some(-100)).maximum(Some(100));
    let map = typed(Type::Object)
        .property_names(Some(of(typed(Type::String).pattern(Some("^[0-9]+$")))))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(of(bias)))));
    or_null(
        of(map),
        "Token id (as a string, below the vocabulary size) → bias added to its logit.",
    )
}

/// `response_format` (`structured::response_format`).
pub fn response_format() -> Schema {
    let kind = |k: &str| of(one_of_strings(&[k]));
    let text = object(&[("type", kind("text"))], &["type"], true);
    let json_object = object(&[("type", kind("json_object"))], &["type"], true);
    let inner = object(
        &[
            ("name", of(typed(Type::String).pattern(Some(NAME_PATTERN)))),
            ("description", any("Ignored by generation; for the caller.")),
            (
                "schema",
                or_null(
                    json_schema("The schema the output follows."),
                    "The schema (null: any JSON).",
                ),
            ),
            (
                "strict",
                any("Accepted: the output follows the schema either way."),
            ),
        ],
        &[],
        true,
    );
    let json_schema_format = object(
        &[("type", kind("json_schema")), ("json_schema", of(inner))],
        &["type", "json_schema"],
        true,
    );
    let formats = Schema::OneOf(
        OneOfBuilder::new()
            .item(of(text))
            .item(of(json_object))
            .item(of(json_schema_format))
            .build(),
    );
    or_null(
        formats,
        "The output's format: free text, any JSON object, or JSON valid against a schema.",
    )
}

/// vLLM's `structured_outputs` (`structured::structured_outputs`).
pub fn structured_outputs() -> Schema {
    let flag = || or_null(of(typed(Type::Boolean)), "A flag.");
    let map = object(
        &[
            (
                "json",
                or_null(
                    json_schema("Output JSON valid against this schema."),
                    "As absent.",
                ),
            ),
            ("regex", or_null(of(non_empty_string()), "As absent.")),
            (
                "choice",
                or_null(
                    array(of(non_empty_string())).min_items(Some(1)).into(),
                    "As absent.",
                ),
            ),
            ("grammar", or_null(of(non_empty_string()), "As absent.")),
            ("json_object", flag()),
            ("disable_fallback", flag()),
            ("disable_any_whitespace", flag()),
            (
                "disable_additional_properties",
                or_null(
                    of(typed(Type::Boolean).enum_values(Some([false]))),
                    "As absent.",
                ),
            ),
            ("whitespace_pattern", null()),
        ],
        &[],
        true,
    )
    .description(Some(
        "At most one of json, regex, choice, grammar and json_object may be set (non-null, not \
         false); not together with response_format.",
    ));
    or_null(of(map), "An output constraint (vLLM's).")
}

/// A message's `content`: text, nothing, or text parts (`messages::message_text`).
fn message_content() -> Schema {
    let part = object(
        &[
            ("type", of(one_of_strings(&["text"]))),
            ("text", of(typed(Type::String))),
        ],
        &["type", "text"],
        false,
    );
    Schema::OneOf(
        OneOfBuilder::new()
            .item(of(typed(Type::String)))
            .item(null())
            .item(array(of(part)))
            .description(Some(
                "A string, null (no text), or a list of text parts whose texts are joined.",
            ))
            .build(),
    )
}

/// A chat message (`messages::check_messages`): what it may carry depends on its role, so one
/// object per group of roles; `tool_call` names the component of an assistant's calls.
pub fn chat_message(tool_call: &str) -> Schema {
    let text = || or_null(of(typed(Type::String)), "Optional.");
    let message = |roles: &[&str], extra: &[(&str, Schema)], required: &[&str], about: &str| {
        let mut properties = vec![
            ("role", of(one_of_strings(roles))),
            ("content", message_content()),
            ("name", text()),
        ];
        properties.extend(extra.iter().cloned());
        of(object(&properties, required, false).description(Some(about)))
    };
    let calls = ArrayBuilder::new().items(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
        tool_call,
    )));
    let no_calls = ("tool_calls", null());
    Schema::OneOf(
        OneOfBuilder::new()
            .item(message(
                &["system", "user", "developer"],
                &[no_calls.clone(), ("tool_call_id", text())],
                &["role"],
                "A system, user or developer message.",
            ))
            .item(message(
                &["assistant"],
                &[
                    ("tool_calls", or_null(calls.into(), "The tools it called.")),
                    ("tool_call_id", text()),
                ],
                &["role"],
                "An earlier answer, with the tools it called.",
            ))
            .item(message(
                &["tool"],
                &[
                    no_calls,
                    (
                        "tool_call_id",
                        of(non_empty_string().description(Some("The call this answers."))),
                    ),
                ],
                &["role", "tool_call_id"],
                "The result of a tool call.",
            ))
            .description(Some("One message of the conversation."))
            .build(),
    )
}

/// `tools` (`tools::function_tool`).
pub fn tools() -> Schema {
    let parameters = or_null(
        of(typed(Type::Object).description(Some(
            "A JSON schema of an object (its `type`, when given, must be \"object\").",
        ))),
        "The arguments' JSON schema (null: an object with no properties).",
    );
    let function = object(
        &[
            ("name", of(typed(Type::String).pattern(Some(NAME_PATTERN)))),
            (
                "description",
                or_null(of(typed(Type::String)), "What the function does."),
            ),
            ("parameters", parameters),
            (
                "strict",
                any("Accepted: arguments follow the schema either way."),
            ),
        ],
        &["name"],
        true,
    );
    let tool = object(
        &[
            ("type", of(one_of_strings(&["function"]))),
            ("function", of(function)),
        ],
        &["type", "function"],
        true,
    );
    or_null(
        array(of(tool)).into(),
        "Functions the model may call; names must differ.",
    )
}

/// `tool_choice` (`tools::tool_plan`).
pub fn tool_choice() -> Schema {
    let named = object(
        &[
            ("type", of(one_of_strings(&["function"]))),
            (
                "function",
                of(object(
                    &[("name", of(typed(Type::String).pattern(Some(NAME_PATTERN))))],
                    &["name"],
                    false,
                )),
            ),
        ],
        &["type", "function"],
        false,
    );
    let choice = Schema::OneOf(
        OneOfBuilder::new()
            .item(of(one_of_strings(&["none", "auto", "required"])))
            .item(of(named))
            .build(),
    );
    or_null(
        choice,
        "none, auto (default with tools), required, or one function named in tools.",
    )
}

/// `finish_reason` of a completion choice.
pub fn completion_finish_reason() -> Schema {
    or_null(
        of(one_of_strings(&["stop", "length", "abort"])),
        "Why the choice ended; null in stream chunks until it has.",
    )
}

/// `finish_reason` of a chat choice.
pub fn chat_finish_reason() -> Schema {
    or_null(
        of(one_of_strings(&["stop", "length", "abort", "tool_calls"])),
        "Why the choice ended; null in stream chunks until it has.",
    )
}

/// `"text_completion"`.
pub fn text_completion() -> Schema {
    of(one_of_strings(&["text_completion"]))
}

/// `"chat.completion"`.
pub fn chat_completion() -> Schema {
    of(one_of_strings(&["chat.completion"]))
}

/// `"chat.completion.chunk"`.
pub fn chat_completion_chunk() -> Schema {
    of(one_of_strings(&["chat.completion.chunk"]))
}

/// `"model"`.
pub fn model_object() -> Schema {
    of(one_of_strings(&["model"]))
}

/// `"list"`.
pub fn list_object() -> Schema {
    of(one_of_strings(&["list"]))
}

/// `"assistant"`.
pub fn assistant_role() -> Schema {
    of(one_of_strings(&["assistant"]))
}

/// `"function"`.
pub fn function_type() -> Schema {
    of(one_of_strings(&["function"]))
}

/// One server-sent event of a stream whose JSON events are `chunk` (a component name): its
/// `data` is a chunk, an error object, or the final `[DONE]`.
pub fn stream_event(chunk: &str) -> Schema {
    let json_data = typed(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(Schema::OneOf(
            OneOfBuilder::new()
                .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(chunk)))
                .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                )))
                .build(),
        )));
    let data = Schema::AnyOf(
        AnyOfBuilder::new()
            .item(of(json_data))
            .item(of(one_of_strings(&["[DONE]"])))
            .description(Some(format!(
                "A {chunk} (JSON), an ErrorBody (JSON; the stream then ends), or [DONE], the \
                 last event of every stream."
            )))
            .build(),
    );
    of(object(
        &[("data", data), ("event", of(one_of_strings(&["message"])))],
        &["data"],
        false,
    )
    .description(Some(
        "One server-sent event (`data: ...` and a blank line); `: keep-alive` comment lines \
         come between events while nothing else is sent.",
    )))
}

#[cfg(test)]
#[path = "schema_tests.rs"]
mod tests;
