-- 0018: holdback release (finance/holdbacks.py, store/royalty_repo.py). An accrual row whose
-- `holdback > 0` is released once `holdback_release_at` has passed: the release journal (id
-- `{accrual_journal_id}.holdback-release`, or `...holdback-release.{k}` when one accrual journal has
-- several release times) moves the holdback to the payable through the ledger, then the rows it
-- released are marked here (`holdback_released_at` = the release journal's posted_at). A crash in
-- between leaves the rows unmarked; the next run posts the same journal id again, which the ledger
-- answers as a replay, and marks them (never a second posting).
ALTER TABLE royalty_accruals
    ADD COLUMN holdback_released_at     timestamptz,
    ADD COLUMN holdback_release_journal text,
    ADD CONSTRAINT royalty_accruals_release_marked
        CHECK ((holdback_released_at IS NULL) = (holdback_release_journal IS NULL)),
    ADD CONSTRAINT royalty_accruals_release_has_holdback
        CHECK (holdback_released_at IS NULL OR (holdback > 0 AND holdback_release_at IS NOT NULL));
CREATE INDEX royalty_accruals_holdback_due ON royalty_accruals (holdback_release_at)
    WHERE holdback > 0 AND holdback_released_at IS NULL;
