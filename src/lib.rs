//! unpart: a reverse proxy that turns `multipart/form-data` uploads into raw streamed bodies
//! with the form fields in headers. The binary (`main.rs`) only wires these modules together.

pub mod accept;
pub mod admin;
pub mod answer;
pub mod body;
pub mod cli;
pub mod config;
pub mod digest;
pub mod drain;
pub mod forward;
pub mod head;
pub mod jobs;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod multipart;
pub mod pace;
pub mod page;
pub mod proxy;
pub mod reader;
pub mod reject;
pub mod rewrite;
pub mod spool;
mod stream;
pub mod upload;
pub mod upstream;
