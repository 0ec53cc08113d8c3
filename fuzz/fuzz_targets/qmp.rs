//! The control socket's QMP session (the layer's `QmpSession`: framing, negotiation,
//! dispatch) answering the layer's commands (`LayerControl`: query-status, query-stats) around
//! vhost-blk-backend's (`BlkControl` on a 1 MiB temp image),
//! fed arbitrary bytes cut into pieces of an input-chosen size, as a client's socket would
//! deliver them.
//!
//! Every reply must be a JSON object with exactly one of `return` and `error` (an error
//! with a string class and description) and nothing but an `id` beside it, and there are
//! no more replies than input bytes; the session keeps at most 64 KiB unparsed. `migrate` is answered from its checked arguments alone (`migrate_params`):
//! a real job would connect to whatever address the input names, or take over one of the
//! fuzzer's own file descriptors through `fd:N`. An accepted URI must print back to
//! itself.
//!
//! Input: one byte, the piece size (0 = everything at once), then the bytes.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use vhost_blk_backend::control::{migrate_params, BlkControl};
use vhost_blk_backend::migration::job::Migrations;
use vhost_blk_backend::migration::transport::{Security, Uri};
use vhost_user_device::control::{ControlHandler, Feed, LayerControl, QmpError, QmpSession};
use vhost_user_device::server::ServerState;

/// Largest message the session keeps unparsed (the layer's limit).
const MAX_MESSAGE: usize = 64 << 10;

struct Handler {
    blk: BlkControl,
}

impl ControlHandler for Handler {
    fn commands(&self) -> Vec<&'static str> {
        self.blk.commands()
    }

    fn status(&self) -> Map<String, Value> {
        self.blk.status()
    }

    fn held(&self) -> bool {
        self.blk.held()
    }

    fn device_stats(&self) -> Map<String, Value> {
        self.blk.device_stats()
    }

    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if command != "migrate" {
            return self.blk.execute(command, args);
        }
        let p = migrate_params(args)?;
        let again: Uri = p
            .uri
            .to_string()
            .parse()
            .expect("an accepted URI parses back");
        assert_eq!(again, p.uri);
        Ok(json!({"id": 0}))
    }
}

fn handler() -> Arc<LayerControl> {
    static HANDLER: OnceLock<Arc<LayerControl>> = OnceLock::new();
    HANDLER
        .get_or_init(|| {
            let device = vhost_fuzz::blk_device("qmp", 1);
            let shared = device.shared().clone();
            let migrations = Arc::new(Migrations::new(
                shared.clone(),
                Security::plain(false),
                std::time::Duration::from_millis(300),
            ));
            Arc::new(LayerControl::new(
                "vhost-blk-backend",
                "0.1.0",
                Arc::new(ServerState::new(1)),
                Arc::new(Handler {
                    blk: BlkControl::new(shared, migrations),
                }),
            ))
        })
        .clone()
}

fn check_reply(r: &Value) {
    let obj = r.as_object().expect("a reply is an object");
    let ret = obj.contains_key("return");
    let err = obj.get("error");
    assert!(ret != err.is_some(), "exactly one of return and error: {r}");
    if let Some(e) = err {
        assert!(e["class"].is_string() && e["desc"].is_string(), "{r}");
    }
    for k in obj.keys() {
        assert!(matches!(k.as_str(), "return" | "error" | "id"), "{r}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = if step == 0 {
        input.len().max(1)
    } else {
        usize::from(step)
    };
    let h = handler();
    let mut s = QmpSession::new("vhost-blk-backend", "0.1.0", h);
    assert!(s.greeting()["QMP"].is_object());
    let mut replies = Vec::new();
    for piece in input.chunks(step) {
        let before = replies.len();
        let feed = s.feed(piece, &mut replies);
        for r in &replies[before..] {
            check_reply(r);
        }
        if feed == Feed::Close {
            break;
        }
        assert!(s.buffered() <= MAX_MESSAGE, "{} bytes kept", s.buffered());
    }
    // A message is at least two bytes ("{}" or "[]", or one bad byte then a retry).
    assert!(replies.len() <= input.len(), "{} replies", replies.len());
});
