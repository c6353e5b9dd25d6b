//! What runs here, without the API: the embedded NHTSA vPIC [`decoder`]
//! (which `vinetl serve` answers with), `vinetl decode --file`
//! ([`decode_file`]), and `vinetl check` ([`check`], with its bounded-memory
//! duplicate counter, [`distinct`]).
//!
//! Nothing here touches the state store or the network.

pub mod check;
pub mod decode_file;
pub mod decoder;
pub mod distinct;
