//! Simulator probes for each phase a row enters, resumes in or aborts from.

use crate::core::migration::MigrationPhaseTag;

pub(super) fn probe_phase(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner => crate::probe!("migration.phase.add_learner"),
        P::CatchUp => crate::probe!("migration.phase.catch_up"),
        P::PromoteLearner => crate::probe!("migration.phase.promote_learner"),
        P::LeadershipTransfer => crate::probe!("migration.phase.leadership_transfer"),
        P::Cutover => crate::probe!("migration.phase.cutover"),
        P::Copy => crate::probe!("migration.phase.copy"),
        P::Tail => crate::probe!("migration.phase.tail"),
        P::Fence => crate::probe!("migration.phase.fence"),
        P::FinalCatchUp => crate::probe!("migration.phase.final_catch_up"),
        P::Reassign => crate::probe!("migration.phase.reassign"),
        P::Complete => crate::probe!("migration.phase.complete"),
    }
}

/// A coordinator picked up a row an earlier one had claimed: the earlier
/// one crashed or lost group-0 leadership while the row was in `phase`.
pub(super) fn probe_resumed(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner => crate::probe!("migration.resumed.add_learner"),
        P::CatchUp => crate::probe!("migration.resumed.catch_up"),
        P::PromoteLearner => crate::probe!("migration.resumed.promote_learner"),
        P::LeadershipTransfer => crate::probe!("migration.resumed.leadership_transfer"),
        P::Cutover => crate::probe!("migration.resumed.cutover"),
        P::Copy => crate::probe!("migration.resumed.copy"),
        P::Tail => crate::probe!("migration.resumed.tail"),
        P::Fence => crate::probe!("migration.resumed.fence"),
        P::FinalCatchUp => crate::probe!("migration.resumed.final_catch_up"),
        P::Reassign => crate::probe!("migration.resumed.reassign"),
        P::Complete => {}
    }
}

pub(super) fn probe_aborted(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner | P::CatchUp => crate::probe!("migration.aborted.before_promotion"),
        P::PromoteLearner | P::LeadershipTransfer => crate::probe!("migration.aborted.rolled_back"),
        P::Copy | P::Tail => crate::probe!("migration.aborted.before_fence"),
        P::Fence | P::FinalCatchUp | P::Reassign => crate::probe!("migration.aborted.unfenced"),
        P::Cutover | P::Complete => {}
    }
}
