//! A headless Chromium driven over the Chrome DevTools Protocol, for tests that look at pages
//! the way a person's browser does: did everything load, did a script fail, does the layout fit
//! a phone.
//!
//! One websocket to the browser carries everything; each [`Page`] is a tab attached in
//! "flatten" mode, so its commands and events travel on that socket tagged with its session id.
//! Calls are synchronous: from an async test that serves the page itself, call them from
//! `tokio::task::spawn_blocking` (or a multi-threaded runtime) so the server keeps running.
//!
//! The browser runs in a process group of its own; dropping the [`Browser`] kills the whole
//! group (no orphaned renderers) and then removes the temporary profile.

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use sidbooth_evaluate::report_html::MAX_SIDE;
use tungstenite::{Message, WebSocket};

/// How long a launch, a page load or one call may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Debian's package; `SIDBOOTH_CHROMIUM` names another binary.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    cdp: Arc<Mutex<Cdp>>,
    child: Child,
    // Dropped after `child` is killed: a profile still in use cannot be removed cleanly.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium with a fresh profile and connects to it. Fails, naming the
    /// package to install, when there is no Chromium.
    pub fn launch() -> Result<Browser> {
        let binary = std::env::var_os("SIDBOOTH_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROMIUM));
        if !binary.exists() {
            bail!(
                "no Chromium at {}: install Debian's package (apt-get install chromium) or set \
                 SIDBOOTH_CHROMIUM to a Chromium binary",
                binary.display()
            );
        }
        let profile = tempfile::Builder::new()
            .prefix("sidbooth-chromium-")
            .tempdir()?;
        let mut command = Command::new(&binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let url = match devtools_url(&mut child) {
            Ok(url) => url,
            Err(e) => {
                kill_group(&mut child);
                return Err(e);
            }
        };
        let cdp = match Cdp::connect(&url) {
            Ok(cdp) => cdp,
            Err(e) => {
                kill_group(&mut child);
                return Err(e);
            }
        };
        Ok(Browser {
            cdp: Arc::new(Mutex::new(cdp)),
            child,
            profile,
        })
    }

    /// The temporary profile directory, removed when the browser is dropped.
    pub fn profile(&self) -> &Path {
        self.profile.path()
    }

    /// Opens `url` in a new tab and waits for its load event. Console messages and errors are
    /// recorded from before the navigation starts.
    pub fn open(&self, url: &str) -> Result<Page> {
        let mut cdp = self.cdp.lock().unwrap();
        let target = cdp.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_owned();
        let attached = cdp.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        let session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        for domain in ["Page", "Runtime", "Log"] {
            cdp.call(Some(&session), &format!("{domain}.enable"), json!({}))?;
        }
        cdp.call(
            Some(&session),
            "Page.setLifecycleEventsEnabled",
            json!({"enabled": true}),
        )?;
        let navigated = cdp.call(Some(&session), "Page.navigate", json!({"url": url}))?;
        if let Some(error) = navigated["errorText"].as_str() {
            bail!("opening {url}: {error}");
        }
        // The load event of this navigation, not of the blank page the tab started with.
        let frame = navigated["frameId"].clone();
        let loader = navigated["loaderId"].clone();
        cdp.wait_event(&session, "Page.lifecycleEvent", |params| {
            params["name"] == "load" && params["frameId"] == frame && params["loaderId"] == loader
        })
        .with_context(|| format!("waiting for {url} to load"))?;
        Ok(Page {
            cdp: self.cdp.clone(),
            session,
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills the browser and every process it started, then reaps it. The group id is the
/// browser's pid, which cannot be reused before the `wait` below.
fn kill_group(child: &mut Child) {
    let group = -(child.id() as libc::pid_t);
    // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
    unsafe { libc::kill(group, libc::SIGKILL) };
    let _ = child.wait();
}

/// Reads Chromium's stderr until it prints the DevTools websocket address. The reader thread
/// keeps draining stderr afterwards so the browser never blocks on a full pipe.
fn devtools_url(child: &mut Child) -> Result<String> {
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            // The receiver is gone once the address was found: keep reading, drop the lines.
            let _ = lines.send(line);
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                if let Some(at) = line.find("ws://") {
                    if line.contains("DevTools listening on") {
                        return Ok(line[at..].trim().to_owned());
                    }
                }
                seen.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "Chromium printed no DevTools address within {TIMEOUT:?}:\n{}",
                    seen.join("\n")
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!(
                    "Chromium exited ({status}) before printing its DevTools address:\n{}",
                    seen.join("\n")
                )
            }
        }
    }
}

/// One tab.
pub struct Page {
    cdp: Arc<Mutex<Cdp>>,
    session: String,
}

impl Page {
    /// Sends any DevTools command to this tab and returns its result.
    pub fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.cdp
            .lock()
            .unwrap()
            .call(Some(&self.session), method, params)
    }

    /// Evaluates `js` as an expression (awaiting it when it is a promise) and returns its
    /// value as JSON; `undefined` is `null`. A thrown exception is an error.
    pub fn eval_json(&self, js: &str) -> Result<Value> {
        let reply = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
        )?;
        if let Some(details) = reply.get("exceptionDetails") {
            let message = details["exception"]["description"]
                .as_str()
                .or_else(|| details["text"].as_str())
                .unwrap_or("exception");
            bail!("evaluating {js}: {message}");
        }
        Ok(reply["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Errors the page reported so far: `console.error` calls, uncaught exceptions and browser
    /// log errors (a resource that failed to load, a blocked request).
    pub fn console_errors(&self) -> Result<Vec<String>> {
        let mut cdp = self.cdp.lock().unwrap();
        // Events travel in order with replies, so one round trip brings in every event the tab
        // sent before it.
        cdp.call(
            Some(&self.session),
            "Runtime.evaluate",
            json!({"expression": "0"}),
        )?;
        Ok(cdp
            .events
            .iter()
            .filter(|e| e.session.as_deref() == Some(self.session.as_str()))
            .filter_map(console_error)
            .collect())
    }

    /// Lays the page out at `width` x `height` CSS pixels; `mobile` also honours its viewport
    /// meta tag, as a phone does.
    pub fn set_viewport(&self, width: u32, height: u32, mobile: bool) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )?;
        Ok(())
    }

    /// A PNG of the whole page at the current viewport width.
    pub fn screenshot_full_page(&self) -> Result<Vec<u8>> {
        let metrics = self.call("Page.getLayoutMetrics", json!({}))?;
        let size = &metrics["cssContentSize"];
        let shot = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                         "scale": 1},
            }),
        )?;
        let data = shot["data"].as_str().context("no screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

fn console_error(event: &Event) -> Option<String> {
    let p = &event.params;
    match event.method.as_str() {
        "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| match &a["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => a["description"].as_str().unwrap_or("").to_owned(),
                    other => other.to_string(),
                })
                .collect();
            Some(format!(
                "console.{}: {}",
                p["type"].as_str()?,
                args.join(" ")
            ))
        }
        "Runtime.exceptionThrown" => {
            let details = &p["exceptionDetails"];
            let message = details["exception"]["description"]
                .as_str()
                .or_else(|| details["text"].as_str())
                .unwrap_or("exception");
            Some(format!("uncaught: {message}"))
        }
        "Log.entryAdded" if p["entry"]["level"] == "error" => {
            let entry = &p["entry"];
            let url = entry["url"].as_str().unwrap_or("");
            Some(format!(
                "{}: {} {url}",
                entry["source"].as_str().unwrap_or("log"),
                entry["text"].as_str().unwrap_or("")
            ))
        }
        _ => None,
    }
}

/// An event the browser sent, with the session (tab) it came from.
struct Event {
    session: Option<String>,
    method: String,
    params: Value,
}

/// The DevTools connection: commands out, replies and events in.
struct Cdp {
    socket: WebSocket<TcpStream>,
    next_id: u64,
    /// Every event received, in order.
    events: Vec<Event>,
}

impl Cdp {
    fn connect(url: &str) -> Result<Cdp> {
        let address = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .with_context(|| format!("not a ws:// address: {url}"))?;
        let stream =
            TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
        let (socket, _) = tungstenite::client(url, stream)
            .map_err(|e| anyhow!("websocket handshake with {url}: {e}"))?;
        Ok(Cdp {
            socket,
            next_id: 1,
            events: Vec::new(),
        })
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(command.to_string()))
            .with_context(|| format!("sending {method}"))?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self
                .receive(deadline)
                .with_context(|| format!("waiting for the reply to {method}"))?;
            if message["id"] != id {
                continue;
            }
            if let Some(error) = message.get("error") {
                bail!("{method} failed: {error}");
            }
            return Ok(message["result"].clone());
        }
    }

    /// Waits for an event of `session` named `method` whose params satisfy `want`, looking at
    /// the events already received first.
    fn wait_event(
        &mut self,
        session: &str,
        method: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + TIMEOUT;
        let mut checked = 0;
        loop {
            let found = self.events[checked..].iter().find(|e| {
                e.session.as_deref() == Some(session) && e.method == method && want(&e.params)
            });
            if let Some(event) = found {
                return Ok(event.params.clone());
            }
            checked = self.events.len();
            self.receive(deadline)?;
        }
    }

    /// The next message; an event is also recorded in `events`.
    fn receive(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no message from the browser within {TIMEOUT:?}");
            }
            self.socket.get_mut().set_read_timeout(Some(left))?;
            let text = match self.socket.read() {
                Ok(Message::Text(text)) => text,
                Ok(_) => continue,
                // The read timed out; tungstenite keeps what it had read, so try again until
                // the deadline.
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(anyhow!("reading from the browser: {e}")),
            };
            let message: Value = serde_json::from_str(text.as_str())?;
            if let Some(method) = message["method"].as_str() {
                self.events.push(Event {
                    session: message["sessionId"].as_str().map(str::to_owned),
                    method: method.to_owned(),
                    params: message["params"].clone(),
                });
            }
            return Ok(message);
        }
    }
}

/// What [`assert_report_page_ok`] checks a report page against.
pub struct ReportExpectations {
    /// `report.meaningful`: the warning banner is shown exactly when this is false.
    pub meaningful: bool,
    /// `report.prompts.len()`.
    pub prompts: usize,
    /// Whether `report.training` is present (the loss curve is shown).
    pub training: bool,
    /// How many overall measures have a value (one bar each in the chart).
    pub measured: usize,
}

impl ReportExpectations {
    pub fn of(report: &sidbooth_domain::report::Report) -> Self {
        Self {
            meaningful: report.meaningful,
            prompts: report.prompts.len(),
            training: report.training.is_some(),
            measured: report
                .measures
                .named()
                .iter()
                .filter(|(_, v)| v.is_some())
                .count(),
        }
    }
}

/// Checks an opened `report.html` as a reader would see it: nothing failed to load, every
/// image decodes and is at most `MAX_SIDE` pixels, no image is a placeholder, the warning banner shows when the numbers mean
/// nothing (within the first screen), the measures table has one row per measure in report
/// order, the bar chart has a bar per computed measure, there is one section per prompt, and the page does not
/// overflow sideways on a phone (390 px) or a laptop (1280 px).
pub fn assert_report_page_ok(page: &Page, expected: &ReportExpectations) {
    let errors = page.console_errors().expect("reading console errors");
    assert!(
        errors.is_empty(),
        "the report page logged errors: {errors:#?}"
    );

    let images = page
        .eval_json(
            &"Promise.all([...document.images].map(i => i.decode().then(() => null, \
             e => i.dataset.asset + ': ' + e))).then(failed => ({\
               count: document.images.length,\
               failed: failed.filter(f => f !== null),\
               broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))\
                 .map(i => i.dataset.asset),\
               unnamed: [...document.images].filter(i => !i.alt).map(i => i.dataset.asset),\
               oversized: [...document.images]\
                 .filter(i => Math.max(i.naturalWidth, i.naturalHeight) > MAX_SIDE)\
                 .map(i => i.dataset.asset),\
               placeholders: [...document.querySelectorAll('.missing')]\
                 .map(m => m.dataset.missing)}))"
                .replace("MAX_SIDE", &MAX_SIDE.to_string()),
        )
        .expect("checking the images");
    assert!(images["count"].as_u64().unwrap() > 0, "no images: {images}");
    for key in ["failed", "broken", "unnamed", "oversized", "placeholders"] {
        assert_eq!(images[key], json!([]), "{key} images: {images}");
    }

    let layout = |width: u32, height: u32, mobile: bool| {
        page.set_viewport(width, height, mobile)
            .expect("setting the viewport");
        page.eval_json(
            "(() => { const w = document.getElementById('meaningless-warning');\
               const r = w && w.getBoundingClientRect();\
               const chart = document.getElementById('measures-chart');\
               return {\
                 viewport: document.documentElement.clientWidth,\
                 page: document.documentElement.scrollWidth,\
                 body: document.body.scrollWidth,\
                 warning: w ? {visible: r.width > 0 && r.height > 0 && \
                   getComputedStyle(w).visibility === 'visible', top: r.top,\
                   text: w.textContent} : null,\
                 measures: [...document.querySelectorAll('table#measures tbody tr')]\
                   .map(r => r.dataset.measure),\
                 bars: chart ? chart.querySelectorAll('rect.bar').length : -1,\
                 chartWidth: chart ? chart.getBoundingClientRect().width : 0,\
                 prompts: document.querySelectorAll('section.prompt').length,\
                 lossCurve: document.getElementById('loss-curve') !== null,\
                 innerHeight: window.innerHeight }; })()",
        )
        .expect("measuring the layout")
    };
    for (width, height, mobile) in [(390, 844, true), (1280, 800, false)] {
        let at = layout(width, height, mobile);
        let viewport = at["viewport"].as_f64().unwrap();
        // The emulated width, less a vertical scrollbar on a laptop.
        let width = width as f64;
        assert!(
            viewport <= width && viewport > width - 24.0,
            "viewport at {width}px: {at}"
        );
        for key in ["page", "body"] {
            assert!(
                at[key].as_f64().unwrap() <= viewport,
                "the {key} overflows sideways at {width}px: {at}"
            );
        }
        if expected.meaningful {
            assert!(
                at["warning"].is_null(),
                "a warning on meaningful numbers: {at}"
            );
        } else {
            let warning = &at["warning"];
            assert_eq!(
                warning["visible"], true,
                "warning banner at {width}px: {at}"
            );
            assert!(
                warning["top"].as_f64().unwrap() < at["innerHeight"].as_f64().unwrap(),
                "the warning banner is below the first screen at {width}px: {at}"
            );
        }
        assert_eq!(
            at["measures"],
            json!(sidbooth_domain::report::MEASURE_NAMES),
            "measures table at {width}px: {at}"
        );
        assert_eq!(
            at["bars"], expected.measured,
            "bars of the measures chart: {at}"
        );
        assert!(
            at["chartWidth"].as_f64().unwrap() > 0.0,
            "bar chart not laid out: {at}"
        );
        assert_eq!(at["prompts"], expected.prompts, "prompt sections: {at}");
        assert_eq!(at["lossCurve"], expected.training, "loss curve: {at}");
    }
}
