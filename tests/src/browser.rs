//! A real headless Chromium driven through WebDriver (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/bootstrap.sh`): chromedriver on a free
//! loopback port, polled until it answers, one fresh browser profile per browser.
//! Screenshots go to `target/console-screenshots/` for a person to look at.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::procs::{Proc, http_ok, wait_until};
use crate::{free_port, workspace_root};

/// `$MCPGUARD_CHROMEDRIVER`, else `chromedriver` on the PATH.
fn chromedriver() -> PathBuf {
    std::env::var_os("MCPGUARD_CHROMEDRIVER").map_or_else(|| "chromedriver".into(), PathBuf::from)
}

/// `$MCPGUARD_CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("MCPGUARD_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

/// The browser window (width, height), as a laptop's.
const WINDOW: (u32, u32) = (1280, 900);
/// The tallest screenshot taken (a long audit page is cut there).
const MAX_SHOT_HEIGHT: u32 = 8000;

pub fn screenshot_dir() -> PathBuf {
    workspace_root().join("target/console-screenshots")
}

pub struct Browser {
    pub client: Client,
    driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start(log_dir: &std::path::Path) -> Browser {
        let port = free_port();
        let mut cmd = Command::new(chromedriver());
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1");
        // Its own process group, so that the browsers it starts end with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut driver = Proc::spawn(&format!("chromedriver-{port}"), cmd, log_dir);
        let status = format!("http://127.0.0.1:{port}/status");
        wait_until(&mut driver, "chromedriver", || {
            let status = status.clone();
            async move { http_ok(&status).await }
        })
        .await;
        let profile = tempfile::tempdir().expect("a browser profile dir");
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium(), "args": args}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "starting chromium through chromedriver: {e}; log:\n{}",
                    driver.log_tail()
                )
            });
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    pub async fn fill(&self, css: &str, value: &str) {
        let input = self.find(css).await;
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }

    /// Clicks `css` and waits for the page it leads to.
    pub async fn click(&self, css: &str) {
        let before = self.client.find(Locator::Css("html")).await.ok();
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
        if let Some(old) = before {
            // The old document goes stale once the next one has loaded.
            let deadline = Instant::now() + Duration::from_secs(10);
            while old.tag_name().await.is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// The button (or link) whose text is `label`, within `css`.
    pub async fn click_labelled(&self, css: &str, label: &str) {
        let scope = self.find(css).await;
        let target = scope
            .find(Locator::XPath(&format!(
                ".//*[self::button or self::a][normalize-space()='{label}']"
            )))
            .await
            .unwrap_or_else(|e| panic!("no {label:?} in {css}: {e}"));
        let old = self.client.find(Locator::Css("html")).await.ok();
        target
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {label:?}: {e}"));
        if let Some(old) = old {
            let deadline = Instant::now() + Duration::from_secs(10);
            while old.tag_name().await.is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// Clicks the element at `xpath` and waits for the page it leads to.
    pub async fn click_xpath(&self, xpath: &str) {
        let target = self
            .client
            .find(Locator::XPath(xpath))
            .await
            .unwrap_or_else(|e| panic!("no {xpath} on the page: {e}"));
        let old = self.client.find(Locator::Css("html")).await.ok();
        target
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {xpath}: {e}"));
        if let Some(old) = old {
            let deadline = Instant::now() + Duration::from_secs(10);
            while old.tag_name().await.is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap_or_default()
    }

    /// The visible text of the whole page.
    pub async fn page_text(&self) -> String {
        self.text("body").await
    }

    /// Saves a screenshot of the whole page as `target/console-screenshots/{name}.png`:
    /// the window grows to the document's height for it, then shrinks back.
    pub async fn screenshot(&self, name: &str) {
        let height = self
            .client
            // The window's height that shows the whole document: its height plus the
            // window's own chrome (outer minus inner).
            .execute(
                "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .map_or(WINDOW.1, |h| {
                u32::try_from(h)
                    .unwrap_or(MAX_SHOT_HEIGHT)
                    .clamp(WINDOW.1, MAX_SHOT_HEIGHT)
            });
        if height > WINDOW.1 {
            let _ = self.client.set_window_size(WINDOW.0, height).await;
        }
        let png = self.client.screenshot().await.expect("a screenshot");
        if height > WINDOW.1 {
            let _ = self.client.set_window_size(WINDOW.0, WINDOW.1).await;
        }
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("creating the screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("writing a screenshot");
    }

    /// The value of the cookie `name`, HttpOnly ones included (WebDriver sees them).
    pub async fn cookie(&self, name: &str) -> Option<fantoccini::cookies::Cookie<'static>> {
        self.client.get_named_cookie(name).await.ok()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the browsers it started: the whole process group. The `--`
        // matters: procps-ng's kill reads `-KILL -<pgid>` as `kill(-1, SIGKILL)`, which
        // as root is every process on the machine (it killed the test runner's whole
        // session, and the developer's shell with it, at the end of each browser test).
        let pgid = self.driver.pid();
        if pgid > 1 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
        }
    }
}
