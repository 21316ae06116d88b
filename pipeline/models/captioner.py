"""The captioner: a pretrained ViT reads a grid of digits, a causal decoder
with cross-attention writes them out, row by row.

Grid images are made of 28x28 cells, so an image's size says how many rows and
columns it has. The encoder tiles the image into its cells, runs the ViT on every
cell (the resolution it was pretrained at, no position interpolation needed) and
tags what the ViT's head reads of each cell (its class token, or the mean of its
patch tokens: `ViT.pooled`) with a learned row and column embedding: the memory.
After each row's cells comes an edge token (end of row, or of the grid). A batch
may mix shapes: the memory is padded and masked.

The decoder cross-attends to the memory. Besides its token and position, each
input carries a cursor: the row and column of the cell written next, counted
from the text written so far (newlines and cells), so that "which cell now" is a
lookup by the same row and column tags the memory carries.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, ModelShape, init_weights
from .patches import shifted, to_images, to_patches
from .vit import ViT, build_vit

# The written form of a grid: digits, '_' for a blank cell, '\n' between rows.
PAD, BOS, EOS = 0, 1, 2
VOCAB = ["<pad>", "<bos>", "<eos>", "\n", "_", *"0123456789"]
NEWLINE, FIRST_CELL = 3, 4  # ids from FIRST_CELL on are cells: a blank or a digit
FIRST_DIGIT = VOCAB.index("0")  # digits are the last ten ids, in order
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i > EOS}
STRAY = "?"  # how a PAD or BOS written inside a grid reads
MAX_GRID = 10
MAX_TEXT_LEN = MAX_GRID * (MAX_GRID + 1)  # 10 rows of 10 cells, newlines, EOS
# Starting bonus on the attention scores of the cell under the cursor: e^4 ~ 55x the
# weight of any other token. Learned only, the alignment stalled (loss flat at 2.1,
# reading nothing, for 100 steps on ragged grids).
CELL_BIAS_INIT = 4.0
# The head's test-time views (`head_shift`) are read only for cells whose top class it
# gives less than this probability: on the validation grids the metrics were the same as
# with views of every cell, at a quarter of the cost (about one digit in ten is unsure).
SURE = 0.99


def encode_text(text: str) -> list[int]:
    """BOS + characters + EOS."""
    try:
        return [BOS, *(CHAR_TO_ID[c] for c in text), EOS]
    except KeyError as e:
        raise ValueError(f"grid text may only hold digits, '_' and newlines, got {e.args[0]!r}") from None


def place(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """One number per (row, column) of a grid, columns 0..MAX_GRID (one past the last)."""
    return row * (MAX_GRID + 1) + col


def decode_ids(ids: list[int]) -> str:
    """The text written before EOS; a PAD or BOS written there becomes STRAY, kept so
    that scoring counts it as the wrong cell it is, not dropped."""
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(VOCAB[i] if i > EOS else STRAY)
    return "".join(out)


class Memory(NamedTuple):
    """What the decoder reads of a batch of grids (S memory tokens per grid, padded)."""

    tokens: torch.Tensor  # (B, S, d)
    mask: torch.Tensor  # (B, S): real tokens
    places: torch.Tensor  # (B, S): each token's `place`, -1 for padding
    cell_logits: Optional[torch.Tensor]  # (B, S, 10): the encoder's head on each cell (0 elsewhere), or None


class Captioner(nn.Module):
    def __init__(self, encoder: ViT, cfg: ModelShape, patch_grid: int, head_logits: bool = False,
                 head_shift: int = 0):
        super().__init__()
        self.cfg, self.patch_grid = cfg, patch_grid  # patch_grid: patches per cell side
        # Add the encoder's own classifier logits, for the cell under the cursor, to the
        # decoder's digit logits: the pretrained head is a better reader of a cell's vector
        # than a decoder that learns one in a few hundred steps (see `decode`).
        self.head_logits = head_logits
        # With head_shift > 0 the head reads each cell five times at test time (eval mode),
        # as is and moved this many pixels each way, and its logits are averaged (see
        # `cell_logits`). Training reads each cell once: the views would cost four more
        # encoder passes per cell and step.
        self.head_shift = head_shift
        self.encoder = encoder
        d_enc = encoder.cfg.d_model
        self.row_emb = nn.Embedding(MAX_GRID, d_enc)
        self.col_emb = nn.Embedding(MAX_GRID, d_enc)
        self.edge_emb = nn.Embedding(2, d_enc)  # past a row's last cell: 0 end of row, 1 end of grid
        self.memory_proj = nn.Linear(d_enc, cfg.d_model) if d_enc != cfg.d_model else nn.Identity()
        self.tok_emb = nn.Embedding(len(VOCAB), cfg.d_model)
        self.pos_emb = nn.Embedding(MAX_TEXT_LEN + 1, cfg.d_model)
        self.cursor_row = nn.Embedding(MAX_GRID + 1, cfg.d_model)
        self.cursor_col = nn.Embedding(MAX_GRID + 1, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.dropout, causal=True, cross=True) for _ in range(cfg.n_layer)
        )
        # one per block and head; 1-D, so that it gets no weight decay
        self.cell_bias = nn.Parameter(torch.full((cfg.n_layer * cfg.n_head,), CELL_BIAS_INIT))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, len(VOCAB), bias=False)
        for module in (self.row_emb, self.col_emb, self.edge_emb, self.memory_proj, self.tok_emb,
                       self.pos_emb, self.cursor_row, self.cursor_col, self.blocks, self.lm_head):
            module.apply(init_weights)
        self.lm_head.weight = self.tok_emb.weight

    def cells(self, patches: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        """(B, P, patch_dim) raster-order patches, zero-padded after each grid's own
        rows*g*cols*g -> (sum of cells, g*g, patch_dim), each grid's cells in row order."""
        g, D = self.patch_grid, patches.shape[-1]
        out = []
        for grid, (rows, cols) in zip(patches, shapes.tolist()):
            if grid.shape[0] < rows * cols * g * g:
                raise ValueError(f"{grid.shape[0]} patches cannot tile a {rows}x{cols} grid of {g}x{g}-patch cells")
            out.append(grid[: rows * cols * g * g].view(rows, g, cols, g, D).permute(0, 2, 1, 3, 4).reshape(rows * cols, g * g, D))
        return torch.cat(out)

    def encode(self, patches: torch.Tensor, shapes: torch.Tensor) -> Memory:
        """Patches and (B, 2) rows, cols -> the memory. A grid's memory: what the ViT's
        head reads of each cell (`ViT.pooled`), in row order, then one edge token per
        row, placed just past the row's last cell (the last row's says "end of grid").
        A smaller grid's memory is padded."""
        cells = self.cells(patches, shapes)
        tokens = self.encoder.pooled(cells)  # (cells, d_enc)
        cells_per_grid = (shapes[:, 0] * shapes[:, 1]).tolist()
        head = self.cell_logits(cells, tokens).split(cells_per_grid) if self.head_logits else [None] * len(cells_per_grid)
        per_grid, places, logits = [], [], []
        for grid, grid_logits, (rows, cols) in zip(tokens.split(cells_per_grid), head, shapes.tolist()):
            r = torch.arange(rows, device=shapes.device)
            c = torch.arange(cols, device=shapes.device)
            cells = grid + self.row_emb(r).repeat_interleave(cols, 0) + self.col_emb(c).repeat(rows, 1)
            edges = self.row_emb(r) + self.edge_emb((r == rows - 1).long())
            per_grid.append(torch.cat([cells, edges]))
            places.append(torch.cat([place(r.repeat_interleave(cols), c.repeat(rows)), place(r, torch.full_like(r, cols))]))
            if grid_logits is not None:
                logits.append(F.pad(grid_logits, (0, 0, 0, rows)))  # none for the edge tokens
        memory = torch.nn.utils.rnn.pad_sequence(per_grid, batch_first=True)
        where = torch.nn.utils.rnn.pad_sequence(places, batch_first=True, padding_value=-1)
        cell_logits = torch.nn.utils.rnn.pad_sequence(logits, batch_first=True) if logits else None
        return Memory(self.memory_proj(memory), where >= 0, where, cell_logits)

    def cell_logits(self, cells: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder head's logits for each cell (cells as `cells` returns them, and
        what the head reads of them). With `head_shift`, in eval mode, for the cells the
        head is unsure of (below SURE): the mean over the cell and its four shifted copies. A digit the
        head misreads where it sits is often read right a pixel away, and the views'
        votes outweigh it."""
        logits = self.encoder.head(tokens)
        if not self.head_shift or self.training:
            return logits
        unsure = (logits.softmax(-1).amax(-1) < SURE).nonzero().flatten()
        if not len(unsure):
            return logits
        g, p = self.patch_grid, int(round(cells.shape[-1] ** 0.5))
        views = [to_patches(view, p) for view in shifted(to_images(cells[unsure], g, g, p), self.head_shift)]
        mean = torch.stack([logits[unsure], *(self.encoder.head(self.encoder.pooled(v)) for v in views)]).mean(0)
        return logits.index_copy(0, unsure, mean)

    @staticmethod
    def cursor(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of the cell written after each position of `ids` (B, T):
        newlines so far, and cells since the last newline."""
        newline = ids == NEWLINE
        cells = torch.cumsum(ids >= FIRST_CELL, dim=1)
        row = torch.cumsum(newline, dim=1)
        cells_at_last_newline = torch.cummax(torch.where(newline, cells, torch.zeros_like(cells)), dim=1).values
        return row.clamp(max=MAX_GRID), (cells - cells_at_last_newline).clamp(max=MAX_GRID)

    def decode(self, memory: Memory, ids: torch.Tensor, start: int = 0, caches: list | None = None,
               cross_weights: list | None = None) -> torch.Tensor:
        """Logits for ids[:, start:]; with `caches` (one per block) only those positions run;
        with `cross_weights` (a list), each block's cross-attention weights are appended to it.

        Cross-attention scores get a learned bonus, per block and head, on the memory
        tokens of the cell under the cursor: where to look is given, what is there is read.
        With `head_logits`, that cell's logits from the encoder's head are added to the
        digits' (the decoder still decides blank, newline and end, and corrects the head)."""
        row, col = (t[:, start:] for t in self.cursor(ids))
        new = ids[:, start:]
        pos = torch.arange(start, ids.shape[1], device=ids.device)
        x = self.tok_emb(new) + self.pos_emb(pos) + self.cursor_row(row) + self.cursor_col(col)
        under_cursor = (place(row, col)[:, :, None] == memory.places[:, None, :]).to(x.dtype)  # (B, T, S): one-hot or 0
        for i, block in enumerate(self.blocks):
            bias = under_cursor.unsqueeze(1) * self.cell_bias.view(len(self.blocks), -1)[i][None, :, None, None]
            x = block(x, context=memory.tokens, context_mask=memory.mask, cache=None if caches is None else caches[i],
                      context_bias=bias, cross_weights=cross_weights)
        logits = self.lm_head(self.ln_f(x))
        if memory.cell_logits is not None:
            logits = logits + F.pad(under_cursor @ memory.cell_logits, (FIRST_DIGIT, 0))
        return logits

    def forward(self, patches: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.decode(self.encode(patches, shapes), ids)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=PAD)
        return logits, loss

    @torch.no_grad()
    def cross_attention(self, patches: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Where the decoder looks while it reads `ids` (B, T): every block's
        cross-attention weights over the memory, (blocks, B, heads, T, S), masked and
        biased as decoding masks and biases them (padding gets none; the cell under the
        cursor gets its bonus). Memory token s < rows*cols is cell s in row order."""
        weights: list[torch.Tensor] = []
        self.decode(self.encode(patches, shapes), ids, cross_weights=weights)
        return torch.stack(weights)

    @torch.no_grad()
    def generate(self, patches: torch.Tensor, shapes: torch.Tensor, use_cache: bool = True) -> list[str]:
        """Greedy decoding of a batch of grids (of any shapes), with a KV cache."""
        memory = self.encode(patches, shapes)
        B = patches.shape[0]
        ids = torch.full((B, 1), BOS, dtype=torch.long, device=patches.device)
        # every cell, a newline after each row but the last, EOS; one more to see a model run on
        max_len = min(MAX_TEXT_LEN, int((shapes[:, 0] * (shapes[:, 1] + 1)).max()) + 1)
        done = torch.zeros(B, dtype=torch.bool, device=patches.device)
        caches = [{"self": {}, "cross": {}} for _ in self.blocks] if use_cache else None
        for step in range(max_len):
            start = step if use_cache else 0
            next_id = self.decode(memory, ids, start, caches)[:, -1].argmax(-1)
            next_id = torch.where(done, torch.full_like(next_id, PAD), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == EOS
            if bool(done.all()):
                break
        return [decode_ids(row[1:].tolist()) for row in ids]

    def embedding_params(self) -> int:
        tables = (self.pos_emb, self.row_emb, self.col_emb, self.edge_emb, self.cursor_row, self.cursor_col)
        return sum(t.weight.numel() for t in tables) + self.encoder.embedding_params()


def build_captioner(cell: int, patch_size: int, encoder_shape: ModelShape, decoder_shape: ModelShape,
                    stem_channels: int = 0, pool: str = "cls", head_logits: bool = False, head_shift: int = 0) -> Captioner:
    """The captioner of `cell`-pixel cells: its ViT encoder (10 classes: digits) and decoder.
    The pipeline and an exported folder's own code both build it here."""
    encoder = build_vit(cell, patch_size, 10, encoder_shape, stem_channels, pool)
    return Captioner(encoder, decoder_shape, patch_grid=cell // patch_size, head_logits=head_logits, head_shift=head_shift)
