"""The paper's datasets as named sources, with the official field mappings (reference A.3 and C).

Each source loads from the Hugging Face hub by default and from a local file when ``local_path`` is
set; everything else (filters, "first N" selection, label words, answer rewriting) goes through the
shared :func:`~antidote_pl.data.sources.map_rows`, so a named source only *declares* its mapping::

    harmful:                         # stage 2 harmful pool: BeaverTails 30k_train, unsafe pairs
      class_path: antidote_pl.data.paper.BeaverTails
      init_args: {split: 30k_train, safe: false}
    task:                            # the same SST-2 records from the GLUE file instead of the hub
      class_path: antidote_pl.data.paper.SST2
      init_args: {split: train, local_path: ../shared/data/sst2/train.tsv}

Local files are read in the layout their suffix names: ``.json``/``.jsonl`` hold the hub's columns
(what ``Dataset.to_json`` writes), ``.csv``/``.tsv`` the dataset's own release format (documented
per class). ``hub_path``/``hub_name``/``data_files`` point the hub path at a mirror or a builder
(``hub_path: json`` plus ``data_files``).

The location arguments (``local_path``, ``hub_name``, ``data_files``, ``revision``, ``cache_dir``,
``limit``, ``offset``) are declared and documented once, by :class:`PaperSource`; a named source
forwards them (``**location``) and declares only its own arguments and defaults (``split``,
``hub_path``). LightningCLI follows the forwarding, so every source still lists all of them in
``--help`` and takes them flat under ``init_args``.

The task sources take everything task-specific (instruction, label words, answer rewriting, the
``category`` name) from their :class:`~antidote_pl.data.tasks.Task`. Records carry ``label`` (the gold
answer the task's parser is compared against) for the classification and maths tasks, and
``category`` where the data has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from inspect import Parameter, signature
from typing import Any, ClassVar

from antidote_pl.data.records import Record, Source
from antidote_pl.data.sources import HFSource, LocalSource, infer_format
from antidote_pl.data.tasks import Task, get_task
from antidote_pl.data.tasks.gsm8k import gsm8k_label
from antidote_pl.errors import bad_value, check_choice, check_int

BEAVERTAILS_SPLITS = ("30k_train", "30k_test", "330k_train", "330k_test")
#: Size of the harmful-score prompt set: the first 1000 unsafe prompts of BeaverTails 30k_test (C.1).
HS_EVAL_SIZE = 1000
#: AlpacaEval items used for fine-tuning; the rest is the (disjoint) test set (reference G.7).
ALPACA_TRAIN_SIZE = 700
#: First AlpacaEval test item (0-based): the official evaluation keeps items with index > 700, i.e.
#: 701-804 (104 items), so item 700 is in neither part.
ALPACA_TEST_START = 701
#: The AlpacaEval file the official "alpaca" task data is byte-identical to (GPT-4-turbo answers).
ALPACA_EVAL_FILE = "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json"
#: ``category`` separator when a BeaverTails pair is flagged in several harm categories (the category
#: names themselves contain commas, e.g. ``"violence,aiding_and_abetting,incitement"``).
CATEGORY_SEPARATOR = ";"


@dataclass(frozen=True)
class Layout:
    """The :func:`~antidote_pl.data.sources.map_rows` arguments that describe one file layout."""

    fields: dict[str, Any] | None = None
    constants: dict[str, Any] | None = None
    label_map: dict[str, str] | None = None
    filters: dict[str, Any] | None = None
    output_replace: dict[str, str] | None = None
    column_names: list[str] | None = None  # header-less CSV/TSV files only


class _PreparedRows:
    """Mixin for the shared sources: rows pass through ``prepare_row`` before the shared mapping."""

    prepare_row = None

    def _map(self, rows: Iterable[Mapping[str, Any]], columns, where: str) -> list[Record]:
        if self.prepare_row is not None:
            rows = map(self.prepare_row, rows)
        return super()._map(rows, columns, where)


class _HubSource(_PreparedRows, HFSource):
    pass


class _FileSource(_PreparedRows, LocalSource):
    pass


class PaperSource(Source):
    """A named dataset: the official mapping, loaded from the hub or from ``local_path``.

    Subclasses declare :meth:`layout` (and optionally :meth:`prepare_row` / :meth:`finish`); the inner
    :class:`~antidote_pl.data.sources.HFSource` or :class:`~antidote_pl.data.sources.LocalSource`
    is built (and its arguments validated) at construction, before anything is read.

    A subclass declares its own arguments and defaults and forwards the rest as ``**location``
    (LightningCLI and :meth:`spec` list the forwarded ones by name); the arguments it sets itself
    are named in :attr:`fixed_arguments`.

    Args:
        split: Hub split to load (ignored for local files, which hold one split).
        local_path: A local file instead of the hub (layout by suffix, see the module docstring).
        hub_path: Hub dataset name (default: the dataset's official one), local mirror directory,
            or builder name.
        hub_name: Hub dataset configuration.
        data_files: Files for builder ``hub_path`` values (a path, a list, or split -> paths).
        revision: Hub revision (commit or tag) that pins the data version.
        cache_dir: Cache directory of ``datasets``.
        limit: Keep at most this many records (after filters and ``offset``).
        offset: Skip this many matching rows first.
    """

    #: Arguments of this class that a subclass sets itself rather than forwarding from its caller
    #: (so neither its configs nor its :meth:`spec` hold them).
    fixed_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        split: str,
        *,
        hub_path: str,
        local_path: str | None = None,
        hub_name: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> None:
        self.split = split
        self.local_path = local_path
        self.hub_path = hub_path
        self.hub_name = hub_name
        self.data_files = data_files
        self.revision = revision
        self.cache_dir = cache_dir
        self.limit = limit
        self.offset = offset
        # Named so that DataModule error messages can say where the records come from.
        self.path = local_path if local_path is not None else hub_path
        self._name_forwarded_arguments()
        self._source = self._build()

    def _name_forwarded_arguments(self) -> None:
        """Lists the arguments a subclass forwarded as ``**location`` by name in its :meth:`spec`.

        :class:`~antidote_pl.data.records.Source` records the arguments bound to the subclass's own
        signature, where the forwarded ones are one mapping holding only those given. Named one by
        one with the values they took here, the spec holds every argument a config can set, as when
        each subclass spelled them out, so recorded specs and cache keys do not depend on how a
        subclass declares its arguments.
        """
        args = getattr(self, "_init_args", None)
        params = signature(type(self).__init__).parameters.values()
        forwarded = next((p.name for p in params if p.kind is Parameter.VAR_KEYWORD), None)
        if args is None or forwarded is None:
            return
        own = {k: v for k, v in args.items() if k != forwarded}
        named = [n for n in signature(PaperSource.__init__).parameters if n != "self"]
        rest = [n for n in named if n not in own and n not in self.fixed_arguments]
        self._init_args = {**own, **{n: getattr(self, n) for n in rest}}

    # ------------------------------------------------------------------ declared by subclasses
    def layout(self, local_format: str | None) -> Layout:
        """The mapping for the hub (``local_format=None``) or a local file of that format."""
        raise NotImplementedError

    def prepare_row(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """Rewrites one raw row before the shared mapping (default: unchanged)."""
        return row

    def finish(self, record: Record) -> Record:
        """Completes one mapped record (default: unchanged)."""
        return record

    # ------------------------------------------------------------------ shared plumbing
    def _build(self) -> HFSource | LocalSource:
        common = {"limit": self.limit, "offset": self.offset}
        if self.local_path is not None:
            fmt = infer_format(self.local_path)
            lay = self.layout(fmt)
            source: HFSource | LocalSource = _FileSource(
                self.local_path, column_names=lay.column_names, **self._mapping(lay), **common
            )
        else:
            lay = self.layout(None)
            source = _HubSource(
                self.hub_path,
                self.hub_name,
                split=self.split,
                data_files=self.data_files,
                revision=self.revision,
                cache_dir=self.cache_dir,
                **self._mapping(lay),
                **common,
            )
        source.prepare_row = self.prepare_row
        return source

    @staticmethod
    def _mapping(lay: Layout) -> dict[str, Any]:
        return {
            "fields": lay.fields,
            "constants": lay.constants,
            "label_map": lay.label_map,
            "filters": lay.filters,
            "output_replace": lay.output_replace,
        }

    def load(self) -> list[Record]:
        """Reads the data and returns the mapped records, in file order."""
        return [self.finish(r) for r in self._source.load()]


# ---------------------------------------------------------------------------------------- BeaverTails
def _flagged_categories(value: Any) -> Any:
    """BeaverTails' hub ``category`` is a dict of 14 harm flags; keep the names of the set ones."""
    if isinstance(value, Mapping):
        return CATEGORY_SEPARATOR.join(name for name, flagged in value.items() if flagged)
    return value


class BeaverTails(PaperSource):
    """PKU-Alignment/BeaverTails question/answer pairs (reference A.3, C.1).

    * alignment data (stage 1): ``BeaverTails(split="30k_train", safe=True, limit=5000)``;
    * harmful pool (stage 2 attack and stage 3 realignment windows):
      ``BeaverTails(split="30k_train", safe=False)``;
    * harmful-score prompts: ``BeaverTails(split="30k_test", safe=False, limit=HS_EVAL_SIZE)``.

    ``instruction`` = prompt, ``output`` = response, ``category`` = the flagged harm categories
    (joined with ``";"``; absent when none is flagged). Local files: the hub columns (``prompt``,
    ``response``, ``is_safe``, ``category``) in JSON/JSONL/CSV/TSV with a header. A file in another
    layout is mapped with ``fields``/``filters``, which *replace* the official ones, e.g. the
    all-unsafe ARTKIT sample (no ``is_safe`` column) with ``filters: {}``, or Safe-RLHF pairs with
    ``fields: {instruction: question, output: answer}`` and ``filters: {label: 1}``.

    Args:
        split: One of ``30k_train``, ``30k_test``, ``330k_train``, ``330k_test``.
        safe: Keep safe pairs (``is_safe`` true) or unsafe pairs.
        fields: Replaces the official column mapping (null: official).
        filters: Replaces the official ``is_safe`` filter (null: official; ``{}``: no filter).

    Raises:
        ConfigError: on a bad split, ``safe`` that is not a bool, or bad mapping arguments.
    """

    def __init__(
        self,
        split: str,
        safe: bool,
        fields: dict[str, str | list[str]] | None = None,
        filters: dict[str, Any] | None = None,
        *,
        hub_path: str = "PKU-Alignment/BeaverTails",
        **location: Any,
    ) -> None:
        check_choice("BeaverTails.split", split, BEAVERTAILS_SPLITS)
        if not isinstance(safe, bool):
            raise bad_value("BeaverTails.safe", safe, "true (alignment pairs) or false (harmful pairs)")
        self.safe = safe
        self.fields = fields
        self.filters = filters
        super().__init__(split, hub_path=hub_path, **location)

    def layout(self, local_format: str | None) -> Layout:
        return Layout(
            fields=self.fields
            if self.fields is not None
            else {"instruction": "prompt", "output": "response", "category": "category"},
            filters=self.filters if self.filters is not None else {"is_safe": self.safe},
        )

    def prepare_row(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        if isinstance(row.get("category"), Mapping):
            return {**row, "category": _flagged_categories(row["category"])}
        return row

    def finish(self, record: Record) -> Record:
        if record.get("category") == "":
            del record["category"]
        return record


# ---------------------------------------------------------------------------------------- tasks
def _label_map(labels: tuple[str, ...], first: int) -> dict[str, str]:
    """Raw class ids (``first``, ``first + 1``, ...) -> label words."""
    return {str(i + first): label for i, label in enumerate(labels)}


def _task_constants(task: Task) -> dict[str, str]:
    """The fields every record of ``task`` shares: its instruction (if fixed) and its category."""
    if task.instruction is None:
        return {"category": task.name}
    return {"instruction": task.instruction, "category": task.name}


class SST2(PaperSource):
    """SST-2 sentiment as the official task records: ``input`` = sentence, ``output`` = ``label`` =
    ``"positive"``/``"negative"``, ``category`` = ``"sst2"`` (reference A.3, C.2).

    Local files: the GLUE TSV (``sentence``, ``label`` with a header; ``dev.tsv`` is the validation
    split) or a JSON/JSONL export of the hub split.

    Args:
        split: ``train`` (67,349 records) or ``validation`` (872, the official test set). The hub
            ``test`` split has no labels and is refused.
    """

    def __init__(self, split: str = "train", *, hub_path: str = "stanfordnlp/sst2", **location: Any) -> None:
        check_choice("SST2.split", split, ("train", "validation"))
        super().__init__(split, hub_path=hub_path, **location)

    def layout(self, local_format: str | None) -> Layout:
        task = get_task("sst2")
        return Layout(
            fields={"input": "sentence", "output": "label"},
            constants=_task_constants(task),
            label_map=_label_map(task.labels, 0),
        )


class AGNews(PaperSource):
    """AG News topics as the official task records: ``input`` = title and description, ``output`` =
    ``label`` = the class name (``World``, ``Sports``, ``Business``, ``Sci/Tech``), ``category`` =
    ``"agnews"`` (reference A.3, C.2).

    Local files by suffix:

    * ``.csv``: the original ``ag_news_csv`` release (no header; class 1-4, title, description);
    * ``.tsv``: the ALPS training subset (no header; description, class name), the offline stand-in
      for the train split (its records have no title);
    * ``.json``/``.jsonl``: the hub columns (``text``, ``label`` 0-3).

    Args:
        split: ``train`` (120,000) or ``test`` (7,600; the official evaluation uses the first 1000).
    """

    def __init__(self, split: str = "train", *, hub_path: str = "fancyzhx/ag_news", **location: Any) -> None:
        check_choice("AGNews.split", split, ("train", "test"))
        super().__init__(split, hub_path=hub_path, **location)

    def layout(self, local_format: str | None) -> Layout:
        task = get_task("agnews")
        constants, classes = _task_constants(task), task.labels
        if local_format == "csv":
            # The hub's `text` is exactly title + " " + description of this file.
            return Layout(
                fields={"input": ["title", "description"], "output": "class"},
                constants=constants,
                label_map=_label_map(classes, 1),
                column_names=["class", "title", "description"],
            )
        if local_format == "tsv":
            return Layout(
                fields={"input": "description", "output": "class"},
                constants=constants,
                label_map={name: name for name in classes},
                column_names=["description", "class"],
            )
        return Layout(
            fields={"input": "text", "output": "label"},
            constants=constants,
            label_map=_label_map(classes, 0),
        )


class GSM8K(PaperSource):
    """GSM8K maths problems as the official task records (reference A.3, C.2).

    ``instruction`` = question; ``output`` = the worked solution with ``####`` replaced by
    ``"The final answer is: "`` (the phrase the answer parser looks for); ``label`` = the gold
    number as text; ``category`` = ``"gsm8k"``. Local files: ``train.jsonl``/``test.jsonl`` of the
    original release (``question``, ``answer``), the same columns as the hub.

    Args:
        split: ``train`` (7,473) or ``test`` (1,319; the official evaluation uses the first 1000).
        hub_name: Hub dataset configuration (``main``).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        hub_path: str = "openai/gsm8k",
        hub_name: str | None = "main",
        **location: Any,
    ) -> None:
        check_choice("GSM8K.split", split, ("train", "test"))
        super().__init__(split, hub_path=hub_path, hub_name=hub_name, **location)

    def layout(self, local_format: str | None) -> Layout:
        task = get_task("gsm8k")
        return Layout(
            fields={"instruction": "question", "output": "answer", "label": "answer"},
            constants=_task_constants(task),
            output_replace=dict(task.output_replace),
        )

    def finish(self, record: Record) -> Record:
        record["label"] = gsm8k_label(record["label"])
        return record


class AlpacaEval(PaperSource):
    """The 805 AlpacaEval instructions with GPT-4-turbo reference answers, split without overlap.

    The official scripts fine-tune on all 805 items and evaluate on items 701-804, so test prompts
    leak into training (reference G.7). Here ``part="train"`` is the first ``train_size`` items and
    ``part="test"`` every item from ``test_start`` on: by default items 701-804 (104), the official
    test prompts, with item 700 in neither part. ``instruction``/``output`` come from the
    file, ``input`` is empty, ``category`` is the item's source subset (``helpful_base``, ``koala``,
    ...). The hub default reads ``alpaca_eval_gpt4_baseline.json`` with the ``json`` builder (the
    dataset's loading script no longer runs under ``datasets`` >= 4); pin a version with
    ``data_files: hf://datasets/tatsu-lab/alpaca_eval@<commit>/alpaca_eval_gpt4_baseline.json``.
    Local files: ``gpt4_1106_preview_model_outputs.json`` (the same 805 items and answers).

    Args:
        part: ``train`` or ``test``.
        train_size: Items in the train part.
        test_start: Index (0-based, file order) of the first test item; ``None``: ``train_size + 1``
            (701 with the default train size, the official ``index > 700``). Must be at least
            ``train_size``, so the parts never share an item.
        data_files: The AlpacaEval file for the ``json`` builder (default: the GPT-4-turbo baseline).

    Raises:
        ConfigError: on a bad part, train size or test start; at load, when the test part would be
            empty.
    """

    # A part is a window (limit, offset) of the file's one split, pinned by data_files, not revision.
    fixed_arguments = ("split", "revision", "limit", "offset")

    def __init__(
        self,
        part: str = "train",
        train_size: int = ALPACA_TRAIN_SIZE,
        test_start: int | None = None,
        *,
        hub_path: str = "json",
        data_files: str | list[str] | dict[str, Any] | None = ALPACA_EVAL_FILE,
        **location: Any,
    ) -> None:
        check_choice("AlpacaEval.part", part, ("train", "test"))
        check_int("AlpacaEval.train_size", train_size, 1)
        if test_start is None:
            test_start = train_size + (ALPACA_TEST_START - ALPACA_TRAIN_SIZE)
        check_int("AlpacaEval.test_start", test_start, train_size)
        self.part = part
        self.train_size = train_size
        self.test_start = test_start
        # The part is a window of the file order: the train part is the first `train_size` items, the
        # test part starts at `test_start` >= `train_size`, so the two can never share an item.
        limit, offset = (train_size, 0) if part == "train" else (None, test_start)
        super().__init__(
            "train",
            hub_path=hub_path,
            data_files=data_files,
            revision=None,
            limit=limit,
            offset=offset,
            **location,
        )

    def layout(self, local_format: str | None) -> Layout:
        return Layout(fields={"instruction": "instruction", "output": "output", "category": "dataset"})


# ---------------------------------------------------------------------------------------- refusals
class SafetyTunedLlamas(LocalSource):
    """Harmful instructions with refusals (Bianchi et al., ``safety_only_data_Instructions.json``),
    an alternative alignment set to BeaverTails' safe pairs. Local file only (2,483 records of
    ``instruction``/``input``/``output``).

    Args:
        path: The JSON file.
        limit: Keep at most this many records (file order).
        offset: Skip this many records first.
    """

    def __init__(self, path: str, limit: int | None = None, offset: int = 0) -> None:
        super().__init__(path, format="json", limit=limit, offset=offset)
