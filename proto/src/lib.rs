//! gRPC contracts of qwen-serve (worker and router services).
//!
//! The `.proto` files and their generated code land here with the worker service; the crate exists
//! now so every other crate's dependency graph is fixed from the start.
