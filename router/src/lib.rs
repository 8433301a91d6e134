//! The front door of qwen-serve: public gRPC and OpenAI-compatible HTTP, tokenization, chat
//! templates, routing policies. Filled by the router work.
