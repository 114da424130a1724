//! One module per tracepoint family, each with its raw and classic front ends over one core.

mod drop;
mod reset;
mod retransmit;
mod state;
