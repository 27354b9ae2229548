"""The host side of a CUDA-graph decode replay: the pinned input buffers it fills for each step (CPU-testable)."""

import numpy as np

from longcat_service.engine.cuda_graph_runner import write_host_inputs


def test_write_host_inputs_fills_rows_padding_and_tables_over_stale_values():
    packed = np.full((4, 8), 99, dtype=np.int64)  # stale values from an earlier, larger step
    tables = np.full((8, 6), 77, dtype=np.int32)
    write_host_inputs(packed, tables, 4, 3, [11, 12, 13], [5, 9, 2], [21, 37, 8], [6, 10, 3], [[1, 2], [3, 4, 5], [6]])
    assert packed[:, :4].tolist() == [[11, 12, 13, 0], [5, 9, 2, 0], [21, 37, 8, -1], [6, 10, 3, 0]]
    assert (packed[:, 4:] == 99).all()  # past the bucket: never copied, left alone
    assert tables[:4, :3].tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0], [0, 0, 0]]
    assert (tables[4:] == 77).all() and (tables[:, 3:] == 77).all()


def test_write_host_inputs_full_bucket_and_empty_table_row():
    packed = np.zeros((4, 2), dtype=np.int64)
    tables = np.ones((2, 2), dtype=np.int32)
    write_host_inputs(packed, tables, 2, 2, [1, 2], [0, 0], [-1, 4], [0, 1], [[], [9]])
    assert packed.tolist() == [[1, 2], [0, 0], [-1, 4], [0, 1]]
    assert tables.tolist() == [[0, 0], [9, 0]]
