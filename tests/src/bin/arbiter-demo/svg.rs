//! The timeline as an SVG, by hand: one lane per host showing where it stood over time (as the
//! watch saw it), under each lane the frames the host sent from the VM's MAC (its switch
//! port), then the counter's replies with the gap of each failover; the phases, the deaths and
//! the partition marked across.

use std::fmt::Write as _;

use colo_tests::status_watch::Look;

use crate::outcome::{failover_gap, Outcome, HOSTS};

/// Where a host stood, for its lane's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stand {
    PrimaryColo,
    SecondaryColo,
    Starting,
    Waiting,
    Alone,
    Fenced,
    Stopped,
    NoApi,
    Down,
}

impl Stand {
    fn of(look: &Option<Look>, dead: bool) -> Stand {
        let Some(l) = look else { return if dead { Stand::Down } else { Stand::NoApi } };
        if l.fenced.is_some() {
            return Stand::Fenced;
        }
        match (l.role.as_str(), l.state.as_str()) {
            (_, "failed-over") | ("none", _) => Stand::Alone,
            (_, "starting") => Stand::Starting,
            ("secondary", _) if l.waiting.is_some() => Stand::Waiting,
            ("primary", "running") => Stand::PrimaryColo,
            ("secondary", "running") => Stand::SecondaryColo,
            _ => Stand::Stopped,
        }
    }

    const ALL: [Stand; 9] = [
        Stand::PrimaryColo,
        Stand::SecondaryColo,
        Stand::Starting,
        Stand::Waiting,
        Stand::Alone,
        Stand::Fenced,
        Stand::Stopped,
        Stand::NoApi,
        Stand::Down,
    ];

    fn colour(self) -> &'static str {
        match self {
            Stand::PrimaryColo => "#3274a1",
            Stand::SecondaryColo => "#9ecae1",
            Stand::Starting => "#b5cf6b",
            Stand::Waiting => "#f2cf5b",
            Stand::Alone => "#e1812c",
            Stand::Fenced => "#d62728",
            Stand::Stopped => "#c7c7c7",
            Stand::NoApi => "#f2f2f2",
            Stand::Down => "#555555",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Stand::PrimaryColo => "primary in COLO",
            Stand::SecondaryColo => "secondary in COLO",
            Stand::Starting => "starting COLO",
            Stand::Waiting => "waiting for the key",
            Stand::Alone => "serving alone",
            Stand::Fenced => "fenced",
            Stand::Stopped => "stopped",
            Stand::NoApi => "standby / no API",
            Stand::Down => "host down",
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const W: f64 = 1200.0;
const LEFT: f64 = 120.0;
const RIGHT: f64 = 30.0;
const LANES_TOP: f64 = 100.0;
const LANE_H: f64 = 30.0;
const STRIP_H: f64 = 10.0;
const LANE_STEP: f64 = 62.0;
const COUNTER_TOP: f64 = LANES_TOP + 3.0 * LANE_STEP + 8.0;
const COUNTER_H: f64 = 28.0;
const AXIS_Y: f64 = COUNTER_TOP + COUNTER_H;
const H: f64 = AXIS_Y + 120.0;

/// The SVG.
pub fn timeline(o: &Outcome) -> String {
    let x0 = o.colo_t - 1.0;
    let x1 = o.end_t + 0.5;
    let px = |t: f64| LEFT + (t.clamp(x0, x1) - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let lane_top = |i: usize| LANES_TOP + i as f64 * LANE_STEP;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">COLO across three hosts with an etcd arbiter: who served, over time</text>"#
    );
    let gaps: Vec<String> = o
        .failovers
        .iter()
        .map(|f| {
            let took = f.took_over_t.map(|t| format!("{:.0} ms", (t - f.kill_t) * 1000.0)).unwrap_or("-".into());
            let gap = failover_gap(&o.replies, f).map(|g| format!("{:.0} ms", g.0 * 1000.0)).unwrap_or("-".into());
            format!("{}→{}: took over after {took}, client gap {gap}", HOSTS[f.dead], HOSTS[f.survivor])
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="42" fill="#444">{}; counter {} → {}, {} increments on one connection; {}</text>"##,
        esc(&gaps.join("; ")),
        o.counter_first,
        o.counter_last,
        o.replies.len(),
        if o.passed() { "every check passed" } else { "SOME CHECKS FAILED" }
    );
    // The partition: a band across hosts b and c.
    if let Some((cut, heal)) = o.partition {
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#9467bd" fill-opacity="0.15"/><text x="{:.1}" y="{:.1}" fill="#6a3d9a" font-size="11">b–c partition</text>"##,
            px(cut),
            lane_top(1) - 4.0,
            (px(heal) - px(cut)).max(1.0),
            2.0 * LANE_STEP,
            px(cut) + 3.0,
            lane_top(1) - 6.0
        );
    }
    // Lanes.
    for (i, name) in HOSTS.iter().enumerate() {
        let top = lane_top(i);
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-weight="bold">host {name}</text><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666" font-size="10">frames as the VM</text>"##,
            LEFT - 8.0,
            top + LANE_H / 2.0 + 4.0,
            LEFT - 8.0,
            top + LANE_H + STRIP_H - 1.0
        );
        let dead = o.killed_at(i);
        let changes: Vec<_> = o.changes.iter().filter(|c| c.host == i).collect();
        for (k, c) in changes.iter().enumerate() {
            let mut end = changes.get(k + 1).map(|n| n.t).unwrap_or(o.end_t);
            if let Some(d) = dead.filter(|d| c.t < *d) {
                end = end.min(d);
            }
            let stand = Stand::of(&c.look, dead.is_some_and(|d| c.t >= d));
            let tip = crate::outcome::describe(&c.look);
            segment(&mut s, px(c.t), px(end), top, stand, &format!("host {name} from {:.2} s: {tip}", c.t));
        }
        if let Some(d) = dead {
            segment(&mut s, px(d), px(o.end_t), top, Stand::Down, &format!("host {name} died at {d:.2} s"));
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{top}" width="{:.1}" height="{LANE_H}" fill="none" stroke="#999"/>"##,
            W - LEFT - RIGHT
        );
        // What the host sent from the VM's MAC; the announcements (RARP) taller and red.
        let frames = o.frames.get(i).map(Vec::as_slice).unwrap_or(&[]);
        let mut ticks = String::new();
        let mut rarps = String::new();
        let mut last_x = f64::MIN;
        for f in frames {
            let x = px(f.t);
            if f.rarp {
                let _ = write!(rarps, "M{x:.1} {:.1}v{:.1}", top + LANE_H, STRIP_H + 2.0);
            } else if x - last_x >= 0.5 {
                let _ = write!(ticks, "M{x:.1} {:.1}v{:.1}", top + LANE_H + 2.0, STRIP_H - 2.0);
                last_x = x;
            }
        }
        let _ = writeln!(s, r##"<path d="{ticks}" stroke="#2ca02c" stroke-width="0.8"/>"##);
        let _ = writeln!(s, r##"<path d="{rarps}" stroke="#d62728" stroke-width="1.5"/>"##);
    }
    // The counter's replies, and the gap of each failover.
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-weight="bold">counter</text>"##,
        LEFT - 8.0,
        COUNTER_TOP + COUNTER_H / 2.0 + 4.0
    );
    let mut ticks = String::new();
    let mut last_x = f64::MIN;
    for t in &o.replies {
        let x = px(*t);
        if x - last_x >= 0.5 {
            let _ = write!(ticks, "M{x:.1} {:.1}v{:.1}", COUNTER_TOP + 4.0, COUNTER_H - 8.0);
            last_x = x;
        }
    }
    let _ = writeln!(s, r##"<path d="{ticks}" stroke="#2ca02c" stroke-width="0.8"/>"##);
    for f in &o.failovers {
        if let Some((gap, from)) = failover_gap(&o.replies, f) {
            let (a, b) = (px(from), px(from + gap));
            let _ = writeln!(
                s,
                r##"<rect x="{a:.1}" y="{COUNTER_TOP}" width="{:.1}" height="{COUNTER_H}" fill="#d62728" fill-opacity="0.3"/><text x="{:.1}" y="{:.1}" fill="#d62728" font-size="11">gap {:.0} ms</text>"##,
                (b - a).max(1.5),
                b + 3.0,
                COUNTER_TOP + 12.0,
                gap * 1000.0
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{COUNTER_TOP}" width="{:.1}" height="{COUNTER_H}" fill="none" stroke="#999"/>"##,
        W - LEFT - RIGHT
    );
    // Phases: a dashed line and the name at each start; the deaths in red.
    for p in &o.phases {
        let x = px(p.start);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="60" y2="{AXIS_Y}" stroke="#777" stroke-dasharray="4 3"/><text x="{:.1}" y="70" fill="#222" font-weight="bold">{}</text>"##,
            x + 3.0,
            esc(p.name)
        );
    }
    for f in &o.failovers {
        let x = px(f.kill_t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="76" y2="{AXIS_Y}" stroke="#d62728" stroke-width="2"/><text x="{:.1}" y="88" fill="#d62728" font-weight="bold">host {} dies</text>"##,
            x + 3.0,
            HOSTS[f.dead]
        );
    }
    for e in &o.events {
        let x = px(e.t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{LANES_TOP}" y2="{AXIS_Y}" stroke="#000" stroke-opacity="0.12"><title>{:.2} s: {}</title></line>"##,
            e.t,
            esc(&e.what)
        );
    }
    // Time axis.
    let span = x1 - x0;
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0].into_iter().find(|st| span / st <= 20.0).unwrap_or(120.0);
    let mut t = (x0 / step).ceil() * step;
    while t <= x1 {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{AXIS_Y}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#444">{t:.0} s</text>"##,
            AXIS_Y + 5.0,
            AXIS_Y + 18.0
        );
        t += step;
    }
    // Legend.
    let mut lx = LEFT;
    let mut ly = AXIS_Y + 44.0;
    for stand in Stand::ALL {
        let label = stand.label();
        let w = 30.0 + label.len() as f64 * 6.5;
        if lx + w > W - RIGHT {
            lx = LEFT;
            ly += 18.0;
        }
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="14" height="12" fill="{}" stroke="#999" stroke-width="0.5"/><text x="{:.1}" y="{ly:.1}">{label}</text>"##,
            ly - 10.0,
            stand.colour(),
            lx + 18.0
        );
        lx += w;
    }
    ly += 18.0;
    let _ = writeln!(
        s,
        r##"<path d="M{LEFT} {:.1}v10" stroke="#2ca02c" stroke-width="2"/><text x="{:.1}" y="{ly:.1}">a frame from the VM's MAC on the host's switch port, a counter reply</text><path d="M{:.1} {:.1}v12" stroke="#d62728" stroke-width="2"/><text x="{:.1}" y="{ly:.1}">RARP: the survivor announces the VM</text>"##,
        ly - 10.0,
        LEFT + 8.0,
        LEFT + 440.0,
        ly - 11.0,
        LEFT + 448.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}" fill="#666">lanes: each host's query-colo-status, polled every 100 ms; time in seconds since the demo started; hover for details</text>"##,
        ly + 20.0
    );
    s.push_str("</svg>\n");
    s
}

fn segment(s: &mut String, a: f64, b: f64, top: f64, stand: Stand, tip: &str) {
    if b <= a {
        return;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{a:.1}" y="{top:.1}" width="{:.1}" height="{LANE_H}" fill="{}"><title>{}</title></rect>"#,
        b - a,
        stand.colour(),
        esc(tip)
    );
}
