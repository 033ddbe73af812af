-- A subject mask the user uploaded beside a photo (same file stem), stored as an input.
ALTER TABLE job_images ADD COLUMN mask_object_key text;

-- The subject mask of each photo, made during describe (or uploaded) and replaceable during
-- review. The PNG itself is the artifact `masks/{idx:02}.png`; this row says where it came from.
CREATE TABLE subject_masks (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    source      text NOT NULL CHECK (source IN ('uploaded', 'sam_vlm_box', 'sam_clip_ranked')),
    -- The box prompt SAM was given, in pixels of the photo: [x0, y0, x1, y1].
    prompt_box  jsonb,
    -- Share of the photo the mask covers.
    coverage    real NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx)
);

-- Things the user should know that did not fail the job (no masks could be made, a
-- description was cut): [{"code", "message", "stage"}], one per code.
ALTER TABLE jobs ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]';
