//! Input applied at most once. The control plane numbers each input it forwards (a `seq`
//! frame before it); the session keeps a [`proto::terminal::InputGate`] for its whole life,
//! across links and replicas, and drops an input whose number is not new: a copy of an entry
//! re-added to Redis, or entries re-read after the stored cursor was set back, never reach
//! psql twice. Input without a number (an older control plane) passes as before. Sans-IO.

use proto::terminal::InputGate;

#[derive(Debug, Default)]
pub struct SeqGate {
    taken: InputGate,
    /// The number announced for the next input frame.
    announced: Option<u64>,
}

impl SeqGate {
    /// A `seq` frame: the next input frame is number `n`.
    pub fn announce(&mut self, n: u64) {
        self.announced = Some(n);
    }

    /// An input frame arrived: whether to apply it.
    pub fn admit(&mut self) -> bool {
        self.announced.take().is_none_or(|n| self.taken.take(n))
    }
}

#[cfg(test)]
mod tests {
    use super::SeqGate;

    #[test]
    fn a_number_at_or_below_the_last_applied_is_dropped() {
        let mut gate = SeqGate::default();
        gate.announce(1);
        assert!(gate.admit());
        gate.announce(2);
        assert!(gate.admit());
        gate.announce(2);
        assert!(!gate.admit(), "a copy");
        gate.announce(1);
        assert!(!gate.admit(), "a re-read after the cursor was set back");
        gate.announce(5);
        assert!(
            gate.admit(),
            "gaps are fine (entries the control plane did not forward)"
        );
        assert!(
            gate.admit(),
            "unnumbered input passes (an older control plane)"
        );
    }
}
