//! The journey state machine (written next).
