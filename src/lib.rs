//! mde-forwarder: pulls Microsoft Defender for Endpoint detections from the
//! SIEM REST API and forwards them to syslog, file and HTTP sinks.

pub mod detection;
pub mod timefmt;
