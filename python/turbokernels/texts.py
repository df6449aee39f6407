"""The texts turbokernels ships for measuring what compression costs: written for this project (plain expository
English, no memorized text: a model that has seen a passage verbatim predicts it too well for its perplexity to show
a loss) and dedicated to the public domain (CC0). `turbokernels demo`, `turbokernels eval`, `bench/e2e.py` and
`bench/quality.py` evaluate on EVAL_TEXT; GPTQ, Wanda and SparseGPT calibrate on CALIB_TEXT, a different text.
"""
from __future__ import annotations

import torch

# 307 tokens with SmolLM2's tokenizer.
EVAL_TEXT = (
    "The river that runs through the old town was once the reason the town existed. Boats carried grain, timber "
    "and wool down to the coast, and the mills along its banks turned day and night. When the railway arrived in "
    "the middle of the nineteenth century, the boats slowly disappeared, and most of the mills were closed or "
    "turned into warehouses. For almost a hundred years the river was treated as a drain: factories emptied their "
    "waste into it, and people stopped walking along the water because of the smell.\n\n"
    "Things began to change in the nineteen seventies. A group of teachers and fishermen started to measure the "
    "water every week and to publish the results in the local newspaper. Their numbers were simple, but they were "
    "hard to ignore. Within ten years the worst factories had been required to clean their water before releasing "
    "it, and the town had built a new treatment plant on the edge of the marshes. Fish returned first, then birds, "
    "and finally people.\n\n"
    "Today the path along the river is the most popular place in town on a summer evening. Children feed the ducks "
    "near the bridge, students read on the steps of the old mill, and a small museum explains how the water was "
    "saved. The museum's favourite exhibit is not a machine or a boat but a stack of notebooks, filled with dates, "
    "temperatures and careful handwriting. Visitors are often surprised that such ordinary work made such a large "
    "difference. The lesson the town likes to repeat is that a problem which is measured patiently, and shared "
    "openly, is already half solved."
)

# Calibration: unrelated to EVAL_TEXT (calibrating on the evaluation text would flatter the calibrated methods).
CALIB_TEXT = (
    "A lighthouse stands at the end of a narrow stone pier, and for more than a century its keepers wrote down the "
    "weather every evening. The log books are kept in a small library in the harbour town. They record storms that "
    "closed the port for days, ships that arrived late with cargoes of coal and salt, and quiet summers when nothing "
    "happened at all. Historians now use these books to study how the climate of the coast has changed. Students "
    "from the university come every spring to copy the numbers into a database, and they often find small notes in "
    "the margins: a birthday, a broken window, a cat that slept on the lamp room stairs. Cooking is another craft "
    "that depends on patient records. A baker who changes one thing at a time, and writes down the flour, the water, "
    "the temperature and the time, will learn more in a month than one who guesses. Gardeners do the same with "
    "seeds and soil, and engineers with bridges and machines.\n\n"
    "The first paragraphs of a good report answer three questions: what was done, what was found, and what it "
    "means for the reader. Details follow, in the order a reader needs them, and numbers come with their units and "
    "with a sense of how precise they are. A table is better than a paragraph of figures, and a picture is better "
    "than a table when the shape of the data matters more than its values. Reports that hide their method behind "
    "confident language are hard to trust, however polished they look.\n\n"
    "In the mountains the seasons arrive late. Snow lies on the northern slopes until the end of May, and the "
    "shepherds wait for the grass before they drive the sheep up from the valley. The walk takes two days. On the "
    "first night the flock rests beside a lake where the water is so clear that the stones on its bottom seem close "
    "enough to touch. In the autumn the same path is walked the other way, and the villages hold a market where the "
    "wool, the cheese and the young animals are sold.\n\n"
    "Computers store numbers in a fixed number of bits, so most real numbers can only be approximated. Adding many "
    "small values to a large one loses the small ones unless they are added together first, and subtracting two "
    "nearly equal numbers leaves mostly rounding error. Careful programs order their operations to keep errors "
    "small, and they test their results against a slower calculation done with more bits. The same care applies "
    "to measurements: an instrument that is never checked against a standard slowly drifts, and nobody notices "
    "until a result looks strange.\n\n"
    "The small train that climbs to the village runs four times a day. Its two carriages were built almost a "
    "hundred years ago and have been repaired so often that hardly a piece of the original wood remains. Tourists "
    "take it for the view; the villagers take it because the road is closed for half of the winter. The driver "
    "knows most passengers by name, waits for the ones who are late, and carries letters and medicine for the "
    "farms that lie far from the station."
)
WINDOW = 64


def calibration_windows(ids: torch.Tensor, window: int = WINDOW) -> list[torch.Tensor]:
    """(1, T) token ids -> windows of `window` tokens, half overlapping (the last one ends at T)."""
    T = ids.shape[1]
    if T <= window:
        return [ids]
    starts = list(range(0, T - window + 1, window // 2))
    if starts[-1] != T - window:
        starts.append(T - window)
    return [ids[:, s:s + window] for s in starts]
