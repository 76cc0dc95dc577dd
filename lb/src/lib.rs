//! warren-lb
