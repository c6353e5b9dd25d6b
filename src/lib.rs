//! vinetl: batch VIN enrichment through the Car Vin API.
//!
//! The library holds every subcommand; the `vinetl` binary only parses
//! arguments. Start at [`vin::Vin`] (the one way a string becomes a VIN) and
//! [`cli`] (what each command does).

pub mod check;
pub mod cli;
pub mod distinct;
pub mod source;
pub mod store;
pub mod vin;
