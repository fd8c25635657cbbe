"""Using a trained model: the sampling service every driver draws through (`generation`),
classifier guidance from a classifier run, FID/IS over hosts (`fid_eval`), the quality report
(`quality`), PNG grids (`images`) and the sample / eval / edit drivers (`drivers`). Imported by
`training` (grids, the final report), never the other way round.
"""
