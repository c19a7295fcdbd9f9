//! The filter's counters in Envoy's stats: their names, and which one a decision
//! moves. Each glue defines them through its own ABI and keeps the ids here.

use mcpguard_core::check::DenyCode;

/// What a counter counts: one request let through, or refused with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Allowed,
    Denied(DenyCode),
}

/// The id of each counter, as the glue's ABI handed it out (`None`: not defined).
pub struct Counters<Id> {
    allowed: Option<Id>,
    /// In [`DenyCode::ALL`]'s order.
    denied: Vec<Option<Id>>,
}

impl<Id: Copy> Counters<Id> {
    /// `define` defines one counter by name: `mcpguard.allowed`, and
    /// `mcpguard.denied.{code}` for every refusal code.
    pub fn define(mut define: impl FnMut(&str) -> Option<Id>) -> Self {
        Counters {
            allowed: define("mcpguard.allowed"),
            denied: DenyCode::ALL
                .iter()
                .map(|c| define(&format!("mcpguard.denied.{}", c.as_str())))
                .collect(),
        }
    }

    /// The counter that `event` moves (`None`: not defined).
    pub fn id(&self, event: Event) -> Option<Id> {
        match event {
            Event::Allowed => self.allowed,
            Event::Denied(code) => {
                let index = DenyCode::ALL.iter().position(|c| *c == code)?;
                self.denied.get(index).copied().flatten()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_code_moves_its_own_named_counter() {
        let mut names = Vec::new();
        let counters = Counters::define(|name| {
            names.push(name.to_owned());
            Some(names.len() - 1)
        });
        assert_eq!(names[0], "mcpguard.allowed");
        assert_eq!(counters.id(Event::Allowed), Some(0));
        for code in DenyCode::ALL {
            let id = counters.id(Event::Denied(code)).unwrap();
            assert_eq!(names[id], format!("mcpguard.denied.{}", code.as_str()));
        }
        let undefined = Counters::<u32>::define(|_| None);
        assert_eq!(undefined.id(Event::Denied(DenyCode::TokenRevoked)), None);
    }
}
