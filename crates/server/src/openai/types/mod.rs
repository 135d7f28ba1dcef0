//! OpenAI wire types for completions, chat, models and vLLM's tokenize/detokenize: what
//! clients send ([`requests`]) and what the server answers ([`responses`]). Pure data: no
//! validation here (that is `validation.rs`). Each type derives its OpenAPI schema, so the
//! document served at `/openapi.json` describes exactly these types.

pub mod integer;
pub mod requests;
pub mod responses;

pub use requests::*;
pub use responses::*;
