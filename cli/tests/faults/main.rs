//! The fault suite (issue 13 item 7): real `kvrouter mocker` and `kvrouter frontend` processes
//! (plus a pyzmq KV-event publisher where the fault is on the event stream), real sockets on
//! 127.0.0.1, faults injected with signals, hostile peers and hostile clients. Each test starts
//! with the guarantee it checks: no crash, no booking left, the index converges to the
//! engine's cache, normal requests still served.
//!
//! * [`workers`] — a worker killed mid-stream, stopped shorter and longer than the suspect
//!   window, restarted on the same ports with an empty cache;
//! * [`events`] — the KV publisher restarted alone, an event gap with a good and with a hostile
//!   replay, an oversize frame;
//! * [`connections`] — an idle-connection flood against a lowered descriptor limit;
//! * [`admin`] — registration of hostile workers.
//!
//! Tests run one at a time ([`harness::serial`]): each starts several processes and the
//! machine may have two cores. Waits only synchronise with other processes (generous
//! deadlines, a failure = a hang guard); nothing asserts on speed. Every process is killed
//! (SIGCONT, then SIGKILL) when its test ends, pass or fail, and a failing test prints the
//! tail of each process's log.
//!
//! `KVROUTER_FAULTS_BIN` runs the suite against another `kvrouter` binary (e.g. an old build,
//! to see which guarantees it lacked); `KVROUTER_PYTHON` is the Python with pyzmq and msgpack
//! (`scripts/test` sets both up).

mod admin;
mod connections;
mod events;
mod harness;
mod workers;
