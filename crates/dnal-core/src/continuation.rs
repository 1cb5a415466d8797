//! Continuation schedules for the temperature `beta`: as it grows, `sigmoid(beta * alpha)`
//! tends to the step function and the relaxed problem becomes the binary one.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The shape of a schedule from its first to its last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The paper's: `beta_k = start * (end / start)^((k + 1) / K)`.
    Geometric {
        /// beta before the first step (the value reached at "step -1").
        start: f64,
        /// beta at the last step.
        end: f64,
    },
    /// `beta_k = start + (end - start) * (k + 1) / K`.
    Linear {
        /// beta before the first step.
        start: f64,
        /// beta at the last step.
        end: f64,
    },
    /// beta fixed.
    Constant {
        /// The value.
        value: f64,
    },
}

/// How often beta changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Once per architecture epoch, before it (the paper).
    #[default]
    Epoch,
    /// Before every iteration.
    Iteration,
}

/// A continuation schedule for beta (serde-configurable).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Continuation {
    /// The curve.
    pub schedule: Schedule,
    /// Per epoch or per iteration.
    #[serde(default)]
    pub granularity: Granularity,
}

impl Default for Continuation {
    /// The paper's schedule: geometric from 1 to 10^4, once per epoch.
    fn default() -> Self {
        Self {
            schedule: Schedule::Geometric {
                start: 1.0,
                end: 1e4,
            },
            granularity: Granularity::Epoch,
        }
    }
}

impl Continuation {
    /// Checks that the values make a valid schedule.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(CoreError::InvalidValue {
                key: format!("continuation.schedule.{field}"),
                message,
            })
        };
        let check = |field: &str, v: f64, positive: bool| {
            if !v.is_finite() {
                bad(field, format!("{v} is not a finite number"))
            } else if positive && v <= 0.0 {
                bad(field, format!("{v} must be > 0 for a geometric schedule"))
            } else {
                Ok(())
            }
        };
        match self.schedule {
            Schedule::Geometric { start, end } => {
                check("start", start, true)?;
                check("end", end, true)
            }
            Schedule::Linear { start, end } => {
                check("start", start, false)?;
                check("end", end, false)
            }
            Schedule::Constant { value } => check("value", value, false),
        }
    }

    /// beta at step `k` of `total` (k = 0..total-1).
    pub fn value(&self, k: usize, total: usize) -> f64 {
        let total = total.max(1);
        let t = (k.min(total - 1) + 1) as f64 / total as f64;
        match self.schedule {
            Schedule::Geometric { start, end } => start * (end / start).powf(t),
            Schedule::Linear { start, end } => start + (end - start) * t,
            Schedule::Constant { value } => value,
        }
    }

    /// beta for iteration `iteration` of architecture epoch `epoch`.
    pub fn beta(
        &self,
        epoch: usize,
        epochs: usize,
        iteration: usize,
        iters_per_epoch: usize,
    ) -> f64 {
        match self.granularity {
            Granularity::Epoch => self.value(epoch, epochs),
            Granularity::Iteration => {
                let per = iters_per_epoch.max(1);
                self.value(epoch * per + iteration.min(per - 1), epochs.max(1) * per)
            }
        }
    }

    /// All values of a per-step schedule with `total` steps.
    pub fn values(&self, total: usize) -> Vec<f64> {
        (0..total).map(|k| self.value(k, total)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_reproduces_the_papers_ten_values() {
        let values = Continuation::default().values(10);
        let paper = [
            2.51, 6.31, 15.8, 39.8, 100.0, 251.0, 631.0, 1585.0, 3981.0, 10000.0,
        ];
        for (k, (v, p)) in values.iter().zip(paper).enumerate() {
            assert!((v - p).abs() / p < 5e-3, "beta_{k} = {v}, paper {p}");
        }
        assert!(
            (values[9] - 1e4).abs() < 1e-9,
            "the last value is exactly beta_end"
        );
    }

    #[test]
    fn linear_and_constant() {
        let lin = Continuation {
            schedule: Schedule::Linear {
                start: 0.0,
                end: 10.0,
            },
            granularity: Granularity::Epoch,
        };
        assert_eq!(lin.values(5), vec![2.0, 4.0, 6.0, 8.0, 10.0]);
        let c = Continuation {
            schedule: Schedule::Constant { value: 7.0 },
            granularity: Granularity::Epoch,
        };
        assert_eq!(c.values(3), vec![7.0; 3]);
    }

    #[test]
    fn per_iteration_schedule_reaches_the_end_on_the_last_iteration() {
        let it = Continuation {
            granularity: Granularity::Iteration,
            ..Continuation::default()
        };
        let first = it.beta(0, 10, 0, 100);
        let last = it.beta(9, 10, 99, 100);
        assert!((first - 1e4f64.powf(1.0 / 1000.0)).abs() < 1e-12);
        assert!((last - 1e4).abs() < 1e-9);
        // Monotone across epoch boundaries.
        assert!(it.beta(3, 10, 99, 100) < it.beta(4, 10, 0, 100));
        // Per-epoch granularity ignores the iteration.
        let ep = Continuation::default();
        assert_eq!(ep.beta(4, 10, 0, 100), ep.beta(4, 10, 99, 100));
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let json = r#"{"schedule":{"kind":"geometric","start":1.0,"end":10000.0},"granularity":"iteration"}"#;
        let c: Continuation = serde_json::from_str(json).unwrap();
        assert_eq!(c.granularity, Granularity::Iteration);
        assert_eq!(
            serde_json::from_str::<Continuation>(&serde_json::to_string(&c).unwrap()).unwrap(),
            c
        );
        let bad = Continuation {
            schedule: Schedule::Geometric {
                start: 0.0,
                end: 1e4,
            },
            ..c
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("continuation") && err.contains("> 0"), "{err}");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn zero_steps_is_not_a_division_by_zero() {
        assert!(Continuation::default().value(0, 0).is_finite());
    }
}
