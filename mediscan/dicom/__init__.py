"""MediScan as a DICOM node: header cross-check results, Secondary Capture and Structured Report writers,
the Storage SCP that receives studies, and the senders that store the results back (C-STORE, STOW-RS)."""
