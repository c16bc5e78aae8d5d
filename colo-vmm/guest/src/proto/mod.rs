//! The services' wire protocols, apart from the sockets that carry them.

pub mod counter;
pub mod http;
pub mod kv;
pub mod line;
pub mod top;
