//! The stages this worker runs, one module each, registered here once.

pub mod describe;
pub mod evaluate;
pub mod generate;
pub mod train;

use sidbooth_domain::Stage;

use crate::stage::StageRunner;

/// Every stage the worker can run. A new stage is one module and one line here.
pub static REGISTRY: [&dyn StageRunner; 4] = [
    &describe::Describe,
    &train::Train,
    &generate::Generate,
    &evaluate::Evaluate,
];

/// The runner of a stage, when this worker has one.
pub fn runner(stage: Stage) -> Option<&'static dyn StageRunner> {
    REGISTRY.iter().copied().find(|r| r.stage() == stage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_of_the_spec_has_exactly_one_runner() {
        for stage in Stage::ALL {
            let runners = REGISTRY.iter().filter(|r| r.stage() == stage).count();
            assert_eq!(runners, 1, "{stage:?}");
        }
    }
}
