"""Unconstrained pruning (UPSCALE): coupled layers keep different channels; exact export with few copies.

Start reading at `plan.build_plan` (what every layer keeps), then `export.export` (how the model is rebuilt
from it); `onnxprune.passes.unconstrained.UnconstrainedPass` runs the steps below in order.

Modules: `config` (the options), `boundaries` (step 1), `records` (the plan's dataclasses), `scores`,
`plan`, `coupled` and `allocate` (step 2), `oracle` (step 3 and the mean repair), `repair` (least-squares
repairs of a plan) with `stream_repair` (stream-aware sequential repair), `export` with `copies` (step 4),
`costmodel`, `layout` and `tuning` (step 5), `naive` (step 6),
`report` (copy ops and nonzero parameters of an export).

The algorithm:

1. **Boundaries** (`boundaries.split_boundaries`). In every coupled group, walk forward from each
   *producer* weight (a Conv/Gemm/MatMul writing the group's channels) through single-input per-channel
   ops until the tensor forks or meets a merge (an op with two of the group's activations: Add, Mul, a
   contraction) (if the walk passed a Concat, the cut moves before that Concat, so a widening copies only
   this producer's channels); walk backward from each *consumer* weight (reading the group's channels) the
   same way (past a Concat, the cut moves after it: one gather then serves all of its inputs). Where a walk
   stops an `Identity` is inserted (after a producer: one on the tensor; before a consumer: one on that
   edge), so that after re-analysis each side of it is a separate dim that may have its own width. The
   split model records which nodes it inserted (`boundaries.SplitModel`).
2. **Pieces** (`plan.build_plan`). The group's dims, joined through every non-boundary node, fall into
   *pieces* (`plan.find_pieces`). A piece holding a producer or consumer weight is a *unit*: it keeps its
   own top channels by its own scores, the same count per unit as constrained pruning keeps per group.
   Scores (`scores.energy_scores`, default): a producer's channel energy E[out^2] after its BatchNorm
   (+ReLU) from (beta, gamma); a consumer's ||W[:, c]||^2 times its input energy (its own pre-activation
   BatchNorm, else the stream producers' energies); ``l1``/``l2`` use BatchNorm-folded weight norms
   instead. The *stream* (every other piece) keeps the union U, rounded up to a multiple of
   ``stream_multiple`` (16, the NCHWc block; only where that adds at most 1/8) with channels no unit keeps
   (exact: every reader has zero columns there). ``share`` blends each unit's (mean-normalised) own scores
   with the group's shared ranking, the constrained criterion of the same name: share=1 is exactly
   constrained pruning (`PrunePass`, no copies), values in between make the kept sets overlap more, so the
   union and the copies stay narrower. ``union_cap`` bounds the stream instead: it holds the group's top
   ``union_cap x k`` channels by the shared ranking (rounded to a multiple of ``stream_multiple``) and each
   unit keeps its own top k among them. With random or weakly correlated scores an unbounded union is
   nearly the whole group, so every absorbed layer and every stream op runs almost dense; the cap is what
   keeps the export near constrained cost. A unit that is its group's only unit (a producer->consumer
   chain) ranks by the group's criterion: there unconstrained and constrained pruning coincide. ``drive``
   orders the choices (`plan.reaching_writers` finds, per tensor, which writer units' outputs reach each
   reader): ``"free"`` every unit its own top channels (a reader may then keep channels no writer reaching
   it keeps, and a writer channels no reader reads: both waste their share of the budget, and a
   producer->readers fork loses the channels the writer and its readers disagree on); ``"writer"`` writers
   choose, each reader chooses among what the writers reaching it keep, then each writer drops what none of
   its readers reads (only where every reader of the stream is a unit; UPSCALE's writer-driven setting: a
   single-writer fork is never narrowed twice, a residual stream's readers choose among the writers'
   union); ``"reader"`` readers choose and each writer keeps what the readers it reaches keep (a writer may
   then keep more than k; with ``group_budget`` the readers keep fewer until the group holds no more
   parameters than constrained pruning at the same ratio); ``"coupled"`` (`coupled.coupled_keeps`) writers
   and readers choose for each other by coordinate descent on a first-order error model: a writer ranks its
   channels by its own score times how much the readers it reaches (and that keep them) weigh them, a reader
   by its own score times the fraction of each channel's energy the writers reaching it still write
   (measured writer output energies with calibration inputs); every unit keeps its group's count, so any
   allocation carries over. ``reader_choice="ls"`` makes a coupled reader keep the columns its least-squares
   refit needs (`coupled.ReaderLS`: greedy OBS on its calibration Hessian). How many channels a group's
   units keep comes from the ratio, or per group from constrained pruning's allocations and parameter targets
   (`allocate.allocate`: uniform / global / LAMP removal orders, the shortest prefix whose *unconstrained*
   plan meets ``target_params``), optionally on allowed counts per group (``keep_counts``). With calibration
   inputs, a reader weights its columns by its input's measured per-channel energy
   (`scores.measured_energy`). Repairs on calibration inputs (`repair.repair_plan`): ``mean``
   (`oracle.mean_repair`) restores each Conv/Gemm output's mean by its bias / the following BatchNorm's
   running mean; ``ls`` and ``seq`` refit every layer's kept columns by ridge least squares (constrained
   repair's maths with the plan's silenced positions as the removed ones; ``seq`` fits layer by layer on the
   masked, already repaired model's own inputs; with ``stream_repair`` a writer into a residual Add refits
   toward the original stream minus what the skip now carries, `stream_repair.repair_stream`; with
   ``relu_refit`` every layer feeding a ReLU is then refitted on the post-ReLU error, `repair_relu.refit_relu`).
3. **Oracle** (`oracle.mask_model`): the original model with each parameter silenced outside its own
   piece's kept set (zero; 1 for variances/divisors: `oracle.silenced_positions`, one description of what
   is silenced, used by the oracle, the export and the repair alike). The export computes exactly this.
4. **Export** (`export.export`). Every dim takes the positions of its width (a unit's own set when the
   unit is *narrowed*, else U) in the chosen channel order; parameters are masked then taken
   (`rewrite.apply_takes`). Boundaries whose two sides differ become copies (`copies`): narrowing ->
   `Slice` (contiguous) or `Gather`, widening -> `Pad` (contiguous) or `Pad`+`Gather` (zero channel
   appended, then gathered into place). A unit is narrowed only where that is exact: a consumer piece (only
   incoming boundaries), a producer piece (only outgoing boundaries, every op maps a silenced channel to
   zero: `rules.facts.op_facts`), or a piece without boundaries (a producer->consumer chain: plain
   constrained pruning). Any other unit is *absorbed*: it runs at width U with its silenced channels as
   zero rows/columns, which is the oracle itself.
5. **Reordering** (`ordering.choose_order`, `layout.optimize_layout`): with ``reorder=True`` each group's
   channel order is chosen so the narrowed units' kept sets are contiguous runs of U, then a per-unit cost
   model (`costmodel.CostModel`) chooses between copying (Slice/Pad/Gather bytes and per-op overhead) and
   absorbing (extra MACs of the zero rows/columns and extra element-wise traffic of the piece).
   `CostModel.measure` fits the costs to onnxruntime here, including ``layout_break`` (a copy between two
   convs also costs layout conversions and lost fusions, fitted on a Conv -> Slice -> Conv chain against
   the absorbed chain). With ``tune=N`` (`tuning.tune_layout`) the plan is exported under a few cost models
   (fitted, copies cheaper, copies dearer, absorb everything, copies only) and the fastest export in
   onnxruntime is kept: all candidates compute the same function, so this is a pure layout choice.
6. **Naive export** (``reorder=False``, `naive`): UPSCALE's definition — the original channel order, every
   unit narrowed where that is exact, each writer's output *scattered* into a zero stream
   (`ConstantOfShape` + `ScatterND`, what an exporter emits for ``out = zeros(...); out[:, idx] = y``) and
   each reader's subset *gathered* (`Gather`, for ``x[:, idx]``). ``naive="pad_gather"`` is a partly
   optimised variant (one zero channel appended by `Pad`, then a single `Gather` places every channel).

`report.copy_report(model)` counts the copy ops the export inserted and the bytes they write per inference.
"""
