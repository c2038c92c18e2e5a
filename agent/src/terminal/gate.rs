//! Input applied at most once. The control plane numbers each input it forwards (a `seq`
//! frame before it); the gate remembers the highest number applied for the session's whole
//! life, across links and replicas, and drops an input whose number is not above it: a copy
//! of an entry re-added to Redis, or entries re-read after the stored cursor was set back,
//! never reach psql twice. Input without a number (an older control plane) passes as before.
//! Sans-IO.

#[derive(Debug, Default)]
pub struct InputGate {
    /// The highest input number applied.
    applied: u64,
    /// The number announced for the next input frame.
    announced: Option<u64>,
}

impl InputGate {
    /// A `seq` frame: the next input frame is number `n`.
    pub fn announce(&mut self, n: u64) {
        self.announced = Some(n);
    }

    /// An input frame arrived: whether to apply it.
    pub fn admit(&mut self) -> bool {
        match self.announced.take() {
            None => true,
            Some(n) if n > self.applied => {
                self.applied = n;
                true
            }
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InputGate;

    #[test]
    fn a_number_at_or_below_the_last_applied_is_dropped() {
        let mut gate = InputGate::default();
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
