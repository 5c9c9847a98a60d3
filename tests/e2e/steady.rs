//! Faults the design rides out: nothing may move.
