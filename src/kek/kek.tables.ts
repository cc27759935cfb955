/** Tables of the `local` KEK provider (non-secret state only: versions, min decryption version). */
export interface KekTables {}
