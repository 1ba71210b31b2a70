//! KV events on the wire: decoding, conversion to core events, ZMQ transports.
